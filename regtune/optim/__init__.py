"""Optimizers and optimizer wrappers, one method family a file.

Wrappers (``regtune.optim.wrapper``) go around any torch optimizer and nest:
``CPR`` (the constraint), ``NormRescale`` (joint-norm rescaling), ``SAM`` (the
perturbation), ``IRE`` (the amplification). ``AdamCPR`` and ``AdamRescale`` are
those wrappers around ``torch.optim.Adam``, with the published constructors.
"""

from regtune.optim.adamcpr import AdamCPR
from regtune.optim.cpr import CPR
from regtune.optim.groups import cpr_param_groups, decay_param_groups, param_groups, split_parameters
from regtune.optim.ire import IRE
from regtune.optim.rescale import AdamRescale, NormRescale
from regtune.optim.sam import SAM

__all__ = ["CPR", "IRE", "SAM", "AdamCPR", "AdamRescale", "NormRescale", "cpr_param_groups", "decay_param_groups",
           "param_groups", "split_parameters"]
