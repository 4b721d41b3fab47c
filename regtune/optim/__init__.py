"""Optimizers and optimizer wrappers, one method family a file."""

from regtune.optim.adamcpr import AdamCPR
from regtune.optim.groups import cpr_param_groups, param_groups, split_parameters
from regtune.optim.rescale import AdamRescale

__all__ = ["AdamCPR", "AdamRescale", "cpr_param_groups", "param_groups", "split_parameters"]
