"""The step as torch.compile sees it: one opaque custom op (``fusedopt::step``).

Tracing never sees data_ptr tables, lr or the step counters, so changing them neither
breaks the graph nor recompiles.  The op names the optimizer by a handle (an int: a
custom op takes no Python objects).
"""
import itertools
import weakref

import torch

_LIVE = weakref.WeakValueDictionary()  # handle -> optimizer
_HANDLES = itertools.count()


def register(opt):
    """A new handle for ``opt``, by which the op finds it."""
    handle = next(_HANDLES)
    _LIVE[handle] = opt
    return handle


@torch.library.custom_op("fusedopt::step", mutates_args=("params", "grads"))
def step_op(handle: int, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """``params`` are the params with grads (declared mutated, so the graph orders the
    step after whatever made the grads; the grads too, which the step unscales in place
    under GradScaler); the step itself reads the optimizer's own tensors."""
    opt = _LIVE[handle]
    own = opt._with_grads()
    # where the compiler handed us copies, the update goes through the originals
    moved = [(a, b) for a, b in zip(params, own) if a.data_ptr() != b.data_ptr()]
    for a, b in moved:
        b.copy_(a)
    opt._eager_step()
    for a, b in moved:
        a.copy_(b)


@step_op.register_fake
def _(handle, params, grads):
    return None
