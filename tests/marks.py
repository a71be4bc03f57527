"""Where a test can run: the device and Triton-interpreter flags and the skip marks built on them
(tests/ is on sys.path: `from marks import needs_triton`)."""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not (CUDA or INTERPRET),
                                  reason="triton backend: needs CUDA or TRITON_INTERPRET=1")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")
gpu = pytest.mark.gpu
# CPU tensors through a Triton kernel: only the interpreter runs them (on a CUDA machine without
# it the kernel would get host pointers); their CUDA twins carry `gpu`
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="CPU tensors: needs TRITON_INTERPRET=1")
