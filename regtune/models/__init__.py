"""Model definitions shared by tasks (CIFAR ResNet-18, VGG ...)."""
