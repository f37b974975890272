import os
import sys

# the shared helpers (tests/helpers/) import as top-level modules: `from harness import NAMES`
HELPERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "helpers")
sys.path.insert(0, HELPERS)

# The tests drive the Triton engine on CPU tensors, through Triton's interpreter (on a GPU
# machine too; bench/gpu.sh runs the compiled engine on CUDA).  The variable is read when
# kernels are built, so it must be set before any test builds one.
os.environ.setdefault("TRITON_INTERPRET", "1")
