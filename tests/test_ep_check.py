"""``scripts/ep_check.py``, the multi-GPU machine's check of expert parallelism, run as CI can: under ``torchrun``
with two CPU processes (gloo, float64, the ``all_to_all`` transport), every routing passing and every rank's line
printed by rank 0."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ep_check_passes_under_torchrun_on_two_cpu_processes():
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "scripts" / "ep_check.py"), "--device", "cpu", "--tokens", "40"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[-1] == "all checks passed"
    checks = [line for line in lines if line.startswith(("ok", "FAIL"))]
    # Three routings, each: the results against the whole layer, and bitwise reruns.
    assert len(checks) == 6 and all(line.startswith("ok") for line in checks)
    assert all("rank 0: worst" in line and "rank 1: worst" in line for line in checks if "gradients" in line)
