"""regtune: hyperparameter studies of regularization methods (library layer, no Ray)."""

__version__ = "0.1.0"
