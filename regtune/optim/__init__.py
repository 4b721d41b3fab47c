"""Optimizers and optimizer wrappers, one method family a file."""

from regtune.optim.adamcpr import AdamCPR
from regtune.optim.groups import cpr_param_groups, decay_param_groups, param_groups, split_parameters
from regtune.optim.ire import IRE
from regtune.optim.rescale import AdamRescale
from regtune.optim.sam import SAM

__all__ = ["IRE", "SAM", "AdamCPR", "AdamRescale", "cpr_param_groups", "decay_param_groups", "param_groups", "split_parameters"]
