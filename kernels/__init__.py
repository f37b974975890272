"""Compiled kernels of fusedopt: the update rules and one multi-tensor engine per backend.

Installed as ``fusedopt.kernels`` (see setup.py).  The engines are imported lazily so that
numba is not needed to use the Triton engine, and triton not to use the Numba engine.
"""
