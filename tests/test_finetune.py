"""Solver-aware fine-tuning of a head (`genie_fast.training.finetune`, ``genie-fast finetune-head``):
the solver's own loop is differentiable with the torch backend, the run lowers its training error,
resumes, refuses what it cannot do, and its head exports into a model file."""
import json

import pytest
import torch

from _helpers import tiny_cond_model
from genie_fast import cli
from genie_fast.models import load_model, save_model
from genie_fast.schedule import time_grid
from genie_fast.solvers import genie, genie_multistep
from genie_fast.training import finetune
from genie_fast.training.run import load_checkpoint

@pytest.fixture(scope="module")
def stem(tmp_path_factory):
    model = tiny_cond_model()
    model.head_error = 0.5
    return save_model(model, tmp_path_factory.mktemp("ft") / "m")


@pytest.mark.parametrize("solver", [genie_multistep, genie])
def test_the_solver_loop_is_differentiable_in_the_head(stem, solver):
    """d(loss)/d(a head weight) by autograd through the solver (torch backend) equals a central
    difference of the same loss (float64), so the fine-tune follows the true gradient."""
    model = load_model(stem, dtype=torch.float64)
    for p in model.parameters():
        p.requires_grad_(False)
    w = model.head.conv_out.weight
    w.requires_grad_(True)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ts = time_grid(model.schedule, 4, "logsnr")
    d = torch.randn(w.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def loss():
        return solver(model, x, ts, model.schedule, afs=True, backend="torch")[0].pow(2).sum()

    with torch.enable_grad():
        auto = float((torch.autograd.grad(loss(), w)[0] * d).sum())
    eps = 1e-6
    with torch.no_grad():
        w.add_(eps * d)
        up = float(loss())
        w.sub_(2 * eps * d)
        down = float(loss())
        w.add_(eps * d)
    assert abs(auto) > 1e-8 and auto == pytest.approx((up - down) / (2 * eps), rel=1e-5)


def _args(tmp_path, stem, *extra):
    return finetune.build_parser().parse_args(["--model", str(stem), "--out", str(tmp_path / "run"), "--n", "8",
                                               "--teacher-steps", "4", "--budgets", "3", "--batch", "8",
                                               "--lr", "3e-3", "--warmup", "1", "--ema", "0.5", *extra])


def test_finetune_lowers_the_training_error_resumes_and_exports(stem, tmp_path):
    args = _args(tmp_path, stem, "--steps", "12")
    ckpt = finetune.finetune_head(args)
    state = load_checkpoint(ckpt, ("head", "ema_head", "step"))
    assert state["step"] == 12 and state["budgets"] == [3] and state["solver"] == "genie_multistep"
    log = (tmp_path / "run" / "log.txt").read_text()
    rel = [float(line.split(" rel ")[1].split()[0]) for line in log.splitlines() if line.startswith("step ")]
    assert rel[0] > rel[-1]  # the relative training error (1 = the starting head's) falls
    # resume: the teacher is reused (no new teacher lines), the step count continues
    finetune.finetune_head(_args(tmp_path, stem, "--steps", "14", "--resume"))
    log2 = (tmp_path / "run" / "log.txt").read_text()[len(log):]
    assert not [ln for ln in log2.splitlines() if ln.startswith("teacher ")]
    assert load_checkpoint(ckpt, ("step",))["step"] == 14
    with pytest.raises(ValueError, match="budgets"):
        finetune.finetune_head(_args(tmp_path, stem, "--steps", "16", "--resume", "--budgets", "4"))
    # export: the network of the model file, the EMA head of the run; provenance of the file kept
    assert cli.main(["export", "--model", str(stem), "--head-ckpt", str(ckpt), "--out", str(tmp_path / "new"),
                     "--head-error", "0.4"]) == 0
    new, old = load_model(tmp_path / "new"), load_model(stem)
    ema = load_checkpoint(ckpt, ("ema_head",))["ema_head"]
    assert all(torch.equal(new.head.state_dict()[k], v) for k, v in ema.items())
    assert all(torch.equal(new.unet.state_dict()[k], v) for k, v in old.unet.state_dict().items())
    assert json.loads((tmp_path / "new.json").read_text())["head_error"] == 0.4


def test_finetune_refuses_bad_budgets_and_export_needs_one_network(stem, tmp_path, capsys):
    with pytest.raises(ValueError, match="--budgets"):
        finetune.finetune_head(_args(tmp_path, stem, "--budgets", "x"))
    with pytest.raises(ValueError, match="--budgets"):
        finetune.finetune_head(_args(tmp_path, stem, "--budgets", "1"))
    assert not (tmp_path / "run").exists()  # refused before any work
    assert cli.main(["export", "--head-ckpt", "x.pt", "--out", str(tmp_path / "o")]) == 2
    assert "--unet-ckpt" in capsys.readouterr().err
