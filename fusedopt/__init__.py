"""fusedopt: fused multi-tensor optimizers (Numba on CPU, Triton on GPU), drop-in for torch.optim."""
from .adagrad import Adagrad
from .adam import Adam, Adamax, AdamW
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = ["Adam", "AdamW", "Adamax", "RMSprop", "Adagrad", "SGD"]
__version__ = "0.1.0"
