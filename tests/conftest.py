"""Test setup: without a GPU, Triton kernels run under the interpreter (TRITON_INTERPRET=1 must be
set before triton is imported)."""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
torch.set_num_threads(min(2, torch.get_num_threads()))
