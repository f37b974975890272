"""The facts the per-step proof compares: for each param its storage address, size in
bytes, dtype, device and whether it is contiguous; the same for its grad and for each
state tensor the plan's tables point at.  The plan records them when it is built and
compares them before every step (bucket._Plan); this module only reads them.

Read in Python, that is 6 attribute reads per tensor, each a Python call that misses the
cache after backward: ~1-2 us per param per step (Adam: param, grad, 3 state tensors),
more than the step's own work on small tensors.  So the reads are made by a small C++
helper (kernels/host.cpp: one pass, prefetching; measured in bench/check_cost.py below
the first wave's unchecked reads), compiled with torch's cpp_extension at first
use and kept under ~/.cache/fusedopt (or $FUSEDOPT_BUILD_DIR), one build per torch
version.  Without a compiler, or with FUSEDOPT_HOST=python, the same facts are read in
Python: the same proof, only slower (a warning says why the helper is missing).

The build takes ~15-20 s (a line on stderr says so while it runs: fusedopt/notice.py);
``fusedopt warmup`` does it ahead, e.g. in a container image.  It is not built when the
package is installed: pip builds a wheel in an isolated environment without torch (the
helper is compiled against the torch that will import it, and must be rebuilt when that
torch changes), and a wheel built once would not match the user's torch.  Once built, a
later process loads the library directly (milliseconds) when the build directory shows
the file this module's last successful build left; otherwise it goes through
cpp_extension.load, which rebuilds what is stale under its lock.
"""
import hashlib
import importlib.util
import itertools
import logging
import operator
import os
import re
import sys
import warnings

import numpy as np
import torch

COLS = 5  # address, size in bytes, dtype, device, flags (kernels/host.cpp)
CONTIGUOUS = 1  # the flags' bit 0; the bits above it are a digest of the sizes (_digest)
# a grad's flags bit 62 (above the digest): its memory meets memory the step writes
# (another param's, a moment's: `p1.grad = p0.detach()`), which torch reads before or
# after that tensor's update by param order, the engines at any time (read(..., written))
MEETS = 1 << 62
_NONE = (-1,) * COLS
_GRAD = operator.attrgetter("grad")
_native = None  # the compiled helper once loaded, False where it cannot be


def _build_dir():
    """Where this torch, Python and helper source build the helper: an extension built
    against another torch's headers must never be loaded (its view of a tensor's layout
    could differ), and two versions of fusedopt on one machine must not rebuild each
    other's helper in one directory (a process could load the other's)."""
    with open(_source(), "rb") as f:
        source = hashlib.sha256(f.read()).hexdigest()[:12]
    tag = re.sub(r"[^\w.+-]", "_", f"torch{torch.__version__}-{torch.version.git_version[:12]}"
                                   f"-py{sys.version_info.major}{sys.version_info.minor}-{source}")
    root = os.environ.get("FUSEDOPT_BUILD_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "fusedopt")
    return os.path.join(root, "host-" + tag)


def _source():
    return os.path.join(os.path.dirname(sys.modules["fusedopt.kernels"].__file__), "host.cpp")


NAME = "fusedopt_host"
LIB = NAME + (".pyd" if os.name == "nt" else ".so")  # cpp_extension's LIB_EXT
READY = "fusedopt-ready"  # size and mtime of the library a finished build left


def _stamp(lib):
    st = os.stat(lib)
    return f"{st.st_size} {st.st_mtime_ns}"


def _load_built(build):
    """The library a finished build left in ``build``, loaded without cpp_extension
    (whose import and ninja run cost ~0.1-1 s per process); None if there is none, or if
    the library changed since (another process is rebuilding it)."""
    lib = os.path.join(build, LIB)
    try:
        with open(os.path.join(build, READY)) as f:
            if f.read().strip() != _stamp(lib):
                return None
    except OSError:
        return None
    spec = importlib.util.spec_from_file_location(NAME, lib)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _NoCudaNotice(logging.Filter):
    # a CUDA build of torch on a machine without a GPU: importing cpp_extension logs
    # "No CUDA runtime is found, using CUDA_HOME=..." in every process, for a helper that
    # is CPU code
    def filter(self, record):
        return not str(record.msg).startswith("No CUDA runtime is found")


def _cpp_extension():
    if "torch.utils.cpp_extension" in sys.modules:
        return sys.modules["torch.utils.cpp_extension"]
    log, quiet = logging.getLogger("torch.utils.cpp_extension"), _NoCudaNotice()
    log.addFilter(quiet)
    try:
        from torch.utils import cpp_extension
    finally:
        log.removeFilter(quiet)
    return cpp_extension


def _build():
    build = _build_dir()
    os.makedirs(build, exist_ok=True)
    try:
        module = _load_built(build)
    except ImportError:  # a damaged file: rebuilt below
        module = None
    if module is not None:
        return module
    from . import notice
    with notice.slow("building the C++ host helper (kernels/host.cpp)"):
        module = _cpp_extension().load(NAME, [_source()], build_directory=build,
                                       extra_cflags=["-O2"], verbose=False)
    tmp = os.path.join(build, f"{READY}.{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(_stamp(os.path.join(build, LIB)))
        os.replace(tmp, os.path.join(build, READY))  # never a half-written stamp
    except OSError:  # only the next process's shortcut is lost
        pass
    return module


def native():
    """The compiled helper, built at the first call; None where it cannot be."""
    global _native
    if _native is None:
        if os.environ.get("FUSEDOPT_HOST") == "python":
            _native = False
        else:
            import fusedopt.kernels  # noqa: F401  (where host.cpp lies)
            try:
                _native = _build()
            except Exception as e:  # no compiler, no ninja, a read-only home...
                warnings.warn(f"fusedopt: the host helper could not be built ({type(e).__name__}: "
                              f"{str(e).strip()[:300]}); the per-step checks run in Python, "
                              f"~0.5 us per tensor slower. FUSEDOPT_HOST=python silences this.")
                _native = False
    return _native or None


_CODES = {}  # the Python reader's own numbering of dtypes and devices


def _code(key):
    return _CODES.setdefault(key, len(_CODES))


def _digest(shape):
    # kernels/host.cpp's digest of a tensor's sizes (uint64 arithmetic), above bit 0
    d = 0
    for s in shape:
        d = (d * 1000003 + s + 1) & 0xFFFFFFFFFFFFFFFF
    return (d & ((1 << 61) - 1)) << 1


def same_shapes(a, b):
    """Row by row, whether two facts tables (of tensors that are not None) describe
    tensors of the same sizes: their digests."""
    return np.array_equal(a[:, -1] >> 1, b[:, -1] >> 1)


def _row(t):
    if t is None or t.layout is not torch.strided:
        return _NONE
    try:
        ptr = t.data_ptr()
    except RuntimeError:  # no storage (a wrapper subclass)
        return _NONE
    return (ptr, t.nbytes, _code(t.dtype), _code(t.device),
            CONTIGUOUS * t.is_contiguous() | _digest(t.shape))


def span(t):
    """[start, end) of the memory a tensor's elements may lie in: its own bytes when
    contiguous, else all of its storage's (kernels/host.cpp takes the same)."""
    if t.is_contiguous():
        return t.data_ptr(), t.data_ptr() + t.nbytes
    s = t.untyped_storage()
    return s.data_ptr(), s.data_ptr() + s.nbytes()


def spans(tensors):
    """span() of each tensor as two int64 arrays (start, end), read in one pass; empty
    (0, 0) where a tensor has no memory (sparse, no storage, no bytes, meta)."""
    W = read([], tensors)[2]
    start, end = W[:, 0].copy(), W[:, 0] + W[:, 1]
    none = (W[:, 0] <= 0) | (W[:, 1] <= 0)
    for k in np.flatnonzero(~none & ((W[:, -1] & CONTIGUOUS) == 0)):
        start[k], end[k] = span(tensors[k])
    start[none] = end[none] = 0
    return start, end


def ranges(start, end):
    """The memory [start, end) (spans()) as sorted, disjoint [start, end) rows of an int64
    array: what ``read(..., written=)`` checks grads against.  (Addresses are compared
    across devices: CUDA's unified addressing gives host and devices one address space.)"""
    keep = end > start
    order = np.argsort(start[keep], kind="stable")
    s, e = start[keep][order], end[keep][order]
    if not len(s):
        return np.empty((0, 2), np.int64)
    reach = np.maximum.accumulate(e)
    first = np.flatnonzero(np.r_[True, s[1:] > reach[:-1]])  # where a merged range begins
    return np.stack([s[first], reach[np.r_[first[1:] - 1, len(s) - 1]]], axis=1)


def meets(written, start, end):
    """For each [start, end) (arrays), whether it meets one of the ``written`` ranges:
    the last range that starts before its end ends after its start."""
    if not len(written):
        return np.zeros(np.shape(start), bool)
    k = np.searchsorted(written[:, 0], end, "left") - 1
    return (k >= 0) & (end > start) & (written[np.maximum(k, 0), 1] > start)


def owned(tensors):
    """Whether every tensor's memory is an allocation of its own (the CPU allocator's),
    as the helper tells; False without it.  Then read() need not search for a fresh grad."""
    helper = native()
    return helper is not None and helper.owned(list(tensors))


def read(params, watched, local=None, written=None, owned=False):
    """(P, G, W): int64 tables of the facts of ``params``, their grads and ``watched``,
    one row per tensor.  ``local`` (a function) maps a DTensor to its shard: the shards'
    facts are read, in Python.  ``written`` (ranges()): a grad whose memory (span())
    meets one of them has MEETS set in its flags; ``owned``: owned() of the tensors
    ``written`` was made of (the helper then skips grads that are fresh allocations)."""
    helper = native() if local is None else None
    if helper is not None:
        P = np.empty((len(params), COLS), np.int64)
        G = np.empty((len(params), COLS), np.int64)
        W = np.empty((len(watched), COLS), np.int64)
        helper.read(params if type(params) is list else list(params),
                    watched if type(watched) is list else list(watched), P, G, W, written,
                    owned)
        return P, G, W
    if local is not None:  # a DTensor's grad is a DTensor: its shard's facts, too
        grads = [None if p.grad is None else local(p.grad) for p in params]
        params, watched = list(map(local, params)), list(map(local, watched))
    else:
        grads = list(map(_GRAD, params))
    P, G, W = (np.fromiter(itertools.chain.from_iterable(map(_row, ts)), np.int64,
                           len(ts) * COLS).reshape(-1, COLS) for ts in (params, grads, watched))
    if written is not None and len(G):
        start, end = G[:, 0].copy(), G[:, 0] + G[:, 1]
        for i in np.flatnonzero((G[:, 0] != -1) & ((G[:, -1] & CONTIGUOUS) == 0)):
            start[i], end[i] = span(grads[i])
        G[:, -1] |= np.where(meets(written, start, end) & (G[:, 0] != -1), MEETS, 0)
    return P, G, W


def bump(params, times):
    """Move each param's autograd version counter ``times`` times, as that many in-place
    updates would (torch's error for an inference tensor)."""
    helper = native()
    params = params if type(params) is list else list(params)
    for _ in range(times):
        if helper is not None:
            helper.bump(params, 1)
        else:
            torch._C._increment_version(params)
