"""fusedopt: fused multi-tensor optimizers (Numba on CPU, Triton on GPU), drop-in for torch.optim."""
from .adam import Adam, Adamax, AdamW

__all__ = ["Adam", "AdamW", "Adamax"]
__version__ = "0.1.0"
