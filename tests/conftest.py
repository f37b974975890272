import os
import sys

# the shared helpers (tests/helpers/) import as top-level modules: `from harness import NAMES`
HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")
sys.path.insert(0, HELPERS)

# The tests drive the Triton engine on CPU tensors, through Triton's interpreter (on a GPU
# machine too; bench/gpu.sh runs the compiled engine on CUDA).  The variable is read when
# kernels are built, so it must be set before any test builds one.
os.environ.setdefault("TRITON_INTERPRET", "1")


# -- the two tiers (tests/tiers.py): `pytest` runs the quick one, `pytest --full` everything
def pytest_addoption(parser):
    parser.addoption("--full", action="store_true",
                     help="run the whole matrix (CI); without it, the quick tier of tests/tiers.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "full: full tier only (tests/tiers.py says why)")


def pytest_collection_modifyitems(config, items):
    import pytest
    import tiers
    quick, full_only = tiers.split(items)
    for item in full_only:
        # marked in both tiers, so that `pytest --full -m full` runs just what the quick tier leaves out
        item.add_marker(pytest.mark.full)
    if not config.getoption("--full") and full_only:
        # every xdist worker collects and splits alike (the split reads ids and parameter
        # indices only), so the workers agree on the list
        config.hook.pytest_deselected(items=full_only)
        items[:] = quick
