"""Each fused op's 10-line benchmark (bench/bench_<op>.py) still matches the op as it is now: the
roles it hands `_step_bench.main` must build the op's tensor arguments (a changed signature broke
it once, when dpmpp_2m_step took its weights row). Read from the script, run once in-process at a
tiny shape: the eager chain and the fused call agree."""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
STEP_OPS = ["genie_step", "ddim_step", "denoise_step", "dpmpp_2m_step", "genie_multistep_step"]


def _roles(op: str, step_bench) -> tuple:
    """The roles the script hands `_step_bench.main(op, roles, __doc__)`, caught by running it."""
    seen = []
    real = step_bench.main
    step_bench.main = lambda name, roles, doc: seen.append((name, roles))
    try:
        runpy.run_path(str(BENCH / f"bench_{op}.py"), run_name="__main__")
    finally:
        step_bench.main = real
    assert [name for name, _ in seen] == [op]
    return seen[0][1]


@pytest.mark.parametrize("op", STEP_OPS)
def test_step_bench_roles_build_the_ops_arguments(op, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    sys.modules.pop("_step_bench", None)
    import _step_bench

    args = _step_bench.make_args(_roles(op, _step_bench), (2, 1, 8, 8), torch.float32, "cpu")
    eager, fused, fused_out, nbytes = _step_bench.step_fns(op, args)
    want = eager()
    want = (want,) if isinstance(want, torch.Tensor) else tuple(want)
    got = fused("auto")()
    got = (got,) if isinstance(got, torch.Tensor) else tuple(got)
    assert nbytes > 0 and len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    fused_out("auto")()
