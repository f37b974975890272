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


# -- where the suite's time goes: FUSEDOPT_TEST_CPU=FILE appends one line per test phase,
# "<cpu seconds> <wall seconds> <numba compile seconds> <phase> <nodeid>", CPU time of the
# test process and of the processes it waited for (numba and Triton compiles, distributed
# workers), and the CPU time numba spent compiling fusedopt's kernels in this process
# (notice.COMPILES).  CPU seconds stay meaningful on a loaded machine where pytest's
# --durations (wall time) do not.
def _rusage():
    import resource
    own, kids = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


if os.environ.get("FUSEDOPT_TEST_CPU"):
    import time

    import pytest

    def _timed(phase):
        @pytest.hookimpl(hookwrapper=True)
        def hook(item, **kwargs):
            from fusedopt import notice
            cpu, wall, comp = _rusage(), time.perf_counter(), notice.COMPILES.seconds
            yield
            with open(os.environ["FUSEDOPT_TEST_CPU"], "a") as f:
                f.write(f"{_rusage() - cpu:.3f} {time.perf_counter() - wall:.3f} "
                        f"{notice.COMPILES.seconds - comp:.3f} {phase} {item.nodeid}\n")
        return hook

    pytest_runtest_setup = _timed("setup")
    pytest_runtest_call = _timed("call")
    pytest_runtest_teardown = _timed("teardown")
