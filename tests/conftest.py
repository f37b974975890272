import os

# The tests drive the Triton engine on CPU tensors, through Triton's interpreter (on a GPU
# machine too; bench/gpu.sh runs the compiled engine on CUDA).  The variable is read when
# kernels are built, so it must be set before any test builds one.
os.environ.setdefault("TRITON_INTERPRET", "1")
