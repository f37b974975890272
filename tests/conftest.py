import os

import torch

# Without a GPU the Triton engine runs in Triton's interpreter, on CPU tensors.  The
# variable is read when kernels are built, so it must be set before any test builds one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
