"""Each fused op's 10-line benchmark (bench/bench_<op>.py) still runs against the op as it is now:
its roles must match the op's tensor arguments (a changed signature breaks it, as the dpmpp_2m
weights did). A tiny shape, two iterations, nothing written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
STEP_OPS = ["genie_step", "ddim_step", "denoise_step", "dpmpp_2m_step", "genie_multistep_step"]


@pytest.mark.parametrize("op", STEP_OPS)
def test_step_bench_runs(op):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(BENCH / f"bench_{op}.py"), "--shape", "2", "1", "8", "8", "--iters", "2",
                        "--repeats", "2", "--no-write"], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fused/eager speedup" in r.stdout


def test_schedule_table_bench_runs():
    r = subprocess.run([sys.executable, str(BENCH / "bench_schedule_table.py"), "--steps", "10", "--no-write"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
