"""fusedopt: fused multi-tensor optimizers (Numba on CPU, Triton on GPU), drop-in for torch.optim."""
from .adadelta import Adadelta
from .adafactor import Adafactor
from .adagrad import Adagrad
from .adam import Adam, Adamax, AdamW
from .ademamix import AdEMAMix
from .asgd import ASGD
from .clip import clip_grad_norm_
from .lamb import LAMB
from .lars import LARS
from .lion import Lion
from .muon import Muon, MuonWithAuxAdam, muon_param_groups
from .nadam import NAdam
from .radam import RAdam
from .release import prepare_for_gradient_release, remove_gradient_release
from .rmsprop import RMSprop
from .rprop import Rprop
from .schedulefree import AdamWScheduleFree, SGDScheduleFree
from .sgd import SGD
from .stableadamw import StableAdamW

try:  # the CPU engine: numba's one-time setup belongs to import, not to the first step
    from .kernels import numba_engine as _numba_engine  # noqa: F401
    from . import notice as _notice
    _notice.install()  # a line on stderr while a first-use compile runs long
except ImportError:  # numba missing: the Triton engine still works
    pass

__all__ = ["Adam", "AdamW", "Adamax", "RMSprop", "Adagrad", "SGD", "Adadelta", "Rprop", "RAdam",
           "NAdam", "ASGD", "Adafactor", "Lion", "AdEMAMix", "AdamWScheduleFree",
           "SGDScheduleFree", "LAMB", "LARS", "StableAdamW", "Muon", "MuonWithAuxAdam",
           "muon_param_groups", "clip_grad_norm_", "prepare_for_gradient_release",
           "remove_gradient_release"]
__version__ = "0.1.0"
