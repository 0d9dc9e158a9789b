"""Test setup: without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1 must be
set before triton is imported)."""

import os
import sys

import torch

# The kernel tests that build CPU tensors run the Triton interpreter on every machine. On a GPU
# machine, tests/test_kernels_cuda.py runs the compiled kernels instead: run it with
# LWZ_TEST_INTERPRET=0 (bench/device_check.sh does).
if not torch.cuda.is_available() or os.environ.get("LWZ_TEST_INTERPRET", "1") == "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, torch.get_num_threads()))
