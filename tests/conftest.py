import os

import torch

# Triton kernels run on CPU tensors under the interpreter; it must be switched on before triton is
# imported, and only where there is no GPU to run them for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()
