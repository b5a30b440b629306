"""DDP with two CPU processes (gloo) matches one process on the same global batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.slow
def test_ddp_two_processes_match_single(tmp_path):
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"run{devices}.pt"
        subprocess.run([sys.executable, str(WORKER), str(out), str(devices)], check=True, timeout=300,
                       cwd=tmp_path, capture_output=True)
        results[devices] = torch.load(out, weights_only=True)
    for name, w in results[1]["weights"].items():
        torch.testing.assert_close(results[2]["weights"][name], w, rtol=1e-4, atol=5e-5)  # float summation order differs
    for name, t in results[1]["trackers"].items():
        torch.testing.assert_close(results[2]["trackers"][name], t)
