"""LAMB and LARS large-batch optimizers for PyTorch.

    from lamb import Lamb, Lars
    opt = Lamb(lamb.param_groups(model, weight_decay=0.01, preset="bert"), lr=6e-3)

Importing this package never compiles anything: the fused kernels build on first use (``lamb.ops``).
"""

from lamb import schedules
from lamb.lamb import Lamb
from lamb.lars import Lars
from lamb.param_groups import NORM_LAYERS, param_groups
from lamb.trust_ratio import trust_ratio

__all__ = ["Lamb", "Lars", "param_groups", "NORM_LAYERS", "schedules", "trust_ratio"]
__version__ = "0.1.0"
