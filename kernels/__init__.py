"""Compiled kernels of fusedopt: the update rules and one multi-tensor engine per backend.

Installed as ``fusedopt.kernels`` (see setup.py).  The engines are imported lazily so that
numba is not needed to use the Triton engine, and triton not to use the Numba engine.
"""


def import_triton():
    """The triton module.  Only the Triton engine needs it (CUDA tensors, backend="triton"),
    so it is not a dependency of a CPU install: where it is missing, say what to install."""
    try:
        import triton
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        raise ModuleNotFoundError(
            "fusedopt's Triton engine (CUDA tensors, or backend='triton') needs triton, which "
            "is not installed: pip install 'fusedopt[gpu]' (or pip install triton; Linux only). "
            "CPU tensors need no triton: backend='numba' (or 'auto').", name="triton") from None
    return triton


def triton_installed():
    """Whether triton can be imported here (without importing it: that takes seconds)."""
    import importlib.util
    try:
        return importlib.util.find_spec("triton") is not None
    except ImportError:
        return False
