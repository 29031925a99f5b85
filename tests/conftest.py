"""Shared test set-up.

Triton kernels are tested on this CPU through the interpreter: set
TRITON_INTERPRET=1 before anything imports triton (a GPU run may unset it).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
