"""Shared test set-up.

Without CUDA, Triton kernels run under the interpreter; the variable must be set before any
``triton.jit`` decoration, so it is set here, before test modules import the kernels.
"""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """Tests call the CLI with ``args=[...]``; pytest's own flags in ``sys.argv`` would make LightningCLI warn."""
    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
