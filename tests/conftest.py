"""Session setup shared by every test: without a GPU, Triton kernels run under its interpreter.

TRITON_INTERPRET must be set before triton.jit decorates any kernel, i.e. before the first import of
cfgengine.kernels, which is why it happens here, at collection.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
