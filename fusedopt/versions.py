"""The torch and triton versions fusedopt is tested on, and so admits (pyproject.toml's
bounds are these: tests/test_interp.py keeps them equal).

CI runs the whole suite on the first pair and the parity subset on the second (.ci/run):
torch 2.14's Linux wheels pin triton 3.8, which is what `pip install timm` (or any
install resolving torch from PyPI) brings.  A version outside these ranges is untested:
``fusedopt check`` says so beside its verdict, since a difference there may be the
environment's (torch's CPU ops, Triton's interpreter) and not the engines'.
"""
from importlib import metadata

# name -> (lowest admitted, first excluded): major.minor releases, every patch release in
# between admitted
TESTED = {"torch": ("2.13", "2.15"), "triton": ("3.8", "3.10")}


def bounds(name):
    return TESTED[name]


def _key(v):
    return tuple(int(x) for x in v.split("+")[0].split(".")[:2] if x.isdigit())


def installed():
    """{name: version} of torch and triton as installed here (triton may be missing)."""
    out = {}
    for name in TESTED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def untested(found=None):
    """'name version' for each of torch and triton installed outside the tested range."""
    found = installed() if found is None else found
    return [f"{n} {v}" for n, v in found.items()
            if not _key(TESTED[n][0]) <= _key(v) < _key(TESTED[n][1])]


def describe():
    """One line: the versions here, and whether they are tested."""
    found = installed()
    here = ", ".join(f"{n} {v}" for n, v in found.items())
    off = untested(found)
    if not off:
        return f"{here}: within the tested ranges"
    ranges = "; ".join(f"{n} >={lo},<{hi}" for n, (lo, hi) in TESTED.items())
    return (f"{here}: {', '.join(off)} outside the tested ranges ({ranges}): a difference "
            f"found here may be this environment's, not the engines'")
