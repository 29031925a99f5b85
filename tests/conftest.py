"""Shared test set-up.

Triton kernels are tested on this CPU through the interpreter: set
TRITON_INTERPRET=1 before anything imports triton (a GPU run may unset it).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def one_thread():
    """Small-matrix training is fastest (and far less load-sensitive) on one torch thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
