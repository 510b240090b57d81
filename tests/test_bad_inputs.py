"""Bad inputs, by class: each is refused with a message naming the problem, or handled correctly.

Classes (issue 14): silent wrong output, data loss, code execution from a file, seeds, obscure
errors, the command line (one line, exit 2, before any work), hangs; and kill -9 during train,
distill and generate, each resumed exactly.
"""
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from genie_fast.cli import main
from genie_fast.models.default import ModelFileError, load_model, save_model
from genie_fast.models.head import GenieModel
from genie_fast.models.unet import UNet, UNetConfig
from genie_fast.schedule import VPSchedule, time_grid
from genie_fast.solvers import HEAD_SOLVERS
from genie_fast.train import load_checkpoint, save_checkpoint

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def threads_restored():
    n = torch.get_num_threads()  # the CLI's --threads sets torch's global thread count
    torch.set_num_threads(1)  # 2 threads next to another busy process are 20-50x slower here
    yield
    torch.set_num_threads(n)


# --------------------------------------------------------------------------- helpers

def _tiny_model(seed=0):
    torch.manual_seed(seed)
    m = GenieModel(UNet("tiny")).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


@pytest.fixture
def stem(tmp_path):
    return save_model(_tiny_model(), tmp_path / "m")


from _helpers import write_idx as _write_idx


def _common(data_root):
    return ["--data-root", str(data_root), "--batch", "4", "--threads", "1", "--log-every", "1"]


def _cli(capsys, *argv):
    """(exit code, the error line written to stderr, else its last line)."""
    rc = main(list(map(str, argv)))
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line[line.index("genie-fast "):] for line in err if "genie-fast " in line]  # after a progress bar
    return rc, (errors[-1] if errors else err[-1] if err else "")


class _Payload:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------- silent wrong output

def test_model_file_with_nan_weights_is_refused(tmp_path):
    m = _tiny_model()
    with torch.no_grad():
        m.unet.conv_in.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):  # save_model refuses to write it
        save_model(m, tmp_path / "nan")
    from safetensors.torch import load_file, save_file
    stem = save_model(_tiny_model(), tmp_path / "ok")
    tensors = load_file(f"{stem}.safetensors")
    tensors["head.conv_out.bias"][0] = float("inf")
    save_file(tensors, f"{stem}.safetensors")
    with pytest.raises(ModelFileError, match=r"ok\.safetensors: non-finite .*head\.conv_out\.bias"):
        load_model(stem)


def test_model_file_tensor_of_another_dtype_is_not_cast(stem):
    from safetensors.torch import load_file, save_file
    tensors = load_file(f"{stem}.safetensors")
    tensors["unet.conv_in.weight"] = tensors["unet.conv_in.weight"].half()
    save_file(tensors, f"{stem}.safetensors")
    with pytest.raises(ModelFileError, match=r"dtype mismatch \(not cast\): unet\.conv_in\.weight torch\.float16"):
        load_model(stem)


def test_unet_refuses_a_wrong_channel_count():
    net = UNet("tiny")
    with pytest.raises(ValueError, match=r"UNet input x must be \(B, 1, H, W\).*\(2, 3, 8, 8\)"):
        net(torch.randn(2, 3, 8, 8), torch.rand(2))
    with pytest.raises(ValueError, match="multiples of 2"):
        net(torch.randn(2, 1, 7, 7), torch.rand(2))


@pytest.mark.parametrize("backend", ["cuda", "triton", "bogus"])
def test_named_backend_that_cannot_run_raises_for_every_op(backend):
    """taylor_step (genie_exact, a genie head returning deps) has no fused kernel, yet a named
    backend that cannot run on the tensors' device is refused as for the fused ops."""
    from genie_fast import ops
    from genie_fast.schedule import COEFF_COLUMNS

    if backend == "cuda" and HAS_CUDA:
        pytest.skip("a GPU is present")
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("Triton runs on CPU tensors in the interpreter")
    x, row = torch.randn(2, 1, 4, 4), torch.zeros(len(COEFF_COLUMNS))
    for call in (lambda: ops.taylor_step(x, x, x, row, backend=backend),
                 lambda: ops.ddim_step(x, x, row, backend=backend)):
        with pytest.raises((ValueError, RuntimeError), match=backend):
            call()


@pytest.fixture(scope="module")
def gmm():
    from genie_fast.models.gmm import GaussianMixture
    return GaussianMixture.random(3, (1, 4, 4), seed=0)


def _nan_below(t_bad):
    """A plain eps model that is fine above time t_bad and returns NaN below it."""
    def eps(x, t):
        return torch.where(t.view(-1, 1, 1, 1) < t_bad, torch.full_like(x, float("nan")), 0.5 * x)
    eps.schedule = VPSchedule()
    eps.image_shape = (1, 4, 4)
    return eps


@pytest.mark.parametrize("solver", ["ddim", "genie", "genie_exact", "heun", "dpm_solver_2", "dpmpp_2m", "dpmpp_3m",
                                    "unipc", "ipndm"])
def test_non_finite_samples_raise_naming_the_step(solver):
    """A model that returns NaN from some step on: by default the call raises, naming that step
    (found by an eager re-run with checks); check_finite=False returns the NaNs as they are."""
    import genie_fast
    from genie_fast.sampling import NonFiniteError

    model = _nan_below(0.3)
    kw = {"head": lambda x, t, e: torch.zeros_like(x)} if solver in HEAD_SOLVERS else {}
    with pytest.raises(NonFiniteError, match=r"of the samples are NaN or inf: the model returned non-finite "
                                             r"(eps|d eps/d gamma)") as err:
        genie_fast.sample(model, n=2, solver=solver, steps=6, grid="uniform", afs=False, **kw)
    ts = time_grid(VPSchedule(), 6, "uniform")
    first_bad = next(n for n in range(6) if float(ts[n]) < 0.3)  # the first step that evaluates there
    step = int(str(err.value).split(" at step ")[1].split()[0])
    # heun, dpm_solver_2 and unipc also evaluate inside step n at t_{n+1} or between: one step earlier
    assert step == first_bad or (solver in ("heun", "dpm_solver_2", "unipc") and step == first_bad - 1), str(err.value)
    x, _ = genie_fast.sample(model, n=2, solver=solver, steps=6, grid="uniform", afs=False, check_finite=False, **kw)
    assert torch.isnan(x).all()


def test_non_finite_noise_data_and_state_are_named(gmm):
    import genie_fast
    from genie_fast.sampling import NonFiniteError

    noise = torch.randn(2, 1, 4, 4)
    noise[1, 0, 0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="the noise x_T holds 1 non-finite values"):
        genie_fast.sample(gmm, noise=noise, solver="ddim", nfe=4)
    with pytest.raises(NonFiniteError, match="the data x0 holds 1 non-finite values"):
        genie_fast.encode(gmm, noise, solver="ddim", nfe=4)

    def huge(x, t):  # finite eps so large that the state update overflows float32
        return torch.full_like(x, 3e38)
    huge.schedule, huge.image_shape = VPSchedule(), (1, 4, 4)
    with pytest.raises(NonFiniteError, match="the ODE state stopped being finite in the update of step 0 of"):
        genie_fast.sample(huge, n=1, solver="ddim", steps=4, afs=False)


@pytest.mark.parametrize("solver", ["ddim", "heun", "dpm_solver_2", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm",
                                    "genie_exact"])
@pytest.mark.parametrize("bad, kind, says", [
    (lambda x: None, TypeError, "the model returned NoneType"),
    (lambda x: x[:1], ValueError, r"the model returned shape \(1, 1, 4, 4\) for an input of shape \(2, 1, 4, 4\)"),
    (lambda x: x[..., :1], ValueError, "no broadcasting"),
    (lambda x: (x, x), TypeError, "the model returned tuple"),
])
def test_model_output_of_the_wrong_shape_or_none(solver, bad, kind, says):
    """Every solver refuses, by name, what some of them used to broadcast silently."""
    import genie_fast

    def eps(x, t):
        return bad(x)
    eps.schedule, eps.image_shape = VPSchedule(), (1, 4, 4)
    with pytest.raises(kind, match=says):
        genie_fast.sample(eps, n=2, solver=solver, steps=3, afs=False)


def test_a_head_returning_none_or_the_wrong_shape(gmm):
    """A head= returning None used to turn GENIE into DDIM without a word."""
    import genie_fast

    for head, kind, says in ((lambda x, t, e: None, TypeError, "head= returned NoneType"),
                             (lambda x, t, e: e[:1], ValueError, "head= returned shape")):
        with pytest.raises(kind, match=says):
            genie_fast.sample(gmm, n=2, solver="genie", head=head, nfe=4)

    class OneOutput(torch.nn.Module):  # eps_and_head that forgets the head
        schedule, image_shape = VPSchedule(), (1, 4, 4)

        def forward(self, x, t):
            return 0.5 * x

        def eps_and_head(self, x, t):
            return 0.5 * x

        def eps_and_deps(self, x, t):
            return 0.5 * x, None
    with pytest.raises(TypeError, match="model.eps_and_head must return a pair"):
        genie_fast.sample(OneOutput(), n=2, solver="genie", nfe=4)
    del OneOutput.eps_and_head
    with pytest.raises(TypeError, match=r"model.eps_and_deps \(its deps\) returned NoneType"):
        genie_fast.sample(OneOutput(), n=2, solver="genie", nfe=4)


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is present")
@pytest.mark.parametrize("solver", ["ddim", "genie", "genie_exact", "heun", "dpmpp_3m", "unipc", "ipndm"])
def test_named_backend_that_cannot_run_raises_in_sample(gmm, solver):
    import genie_fast

    kw = {"head": lambda x, t, e: torch.zeros_like(x)} if solver in HEAD_SOLVERS else {}
    for afs in (False, True):
        with pytest.raises(ValueError, match="backend 'cuda' runs on CUDA tensors"):
            genie_fast.sample(gmm, n=2, solver=solver, steps=3, afs=afs, backend="cuda", **kw)


def test_sample_arguments_refused_by_name(gmm):
    import genie_fast

    for kw, kind, says in (
            ({"n": 2, "nfe": 0}, ValueError, "nfe must be >= 1, got 0"),
            ({"n": 2, "nfe": 2.5}, TypeError, "nfe must be an int"),
            ({"n": 2, "nfe": float("inf")}, TypeError, "nfe must be an int"),
            ({"n": 2, "nfe": True}, TypeError, "nfe must be an int"),
            ({"n": 2, "steps": float("inf")}, TypeError, "steps must be an int"),
            ({"n": float("inf")}, TypeError, "n must be an int"),
            ({"n": 2.0}, TypeError, "n must be an int"),
            ({"n": 0}, ValueError, "n must be >= 1"),
            ({"n": 2, "seed": -1}, ValueError, "seed must be in \\[0, 2\\*\\*32\\)"),
            ({"n": 2, "seed": 2**32}, ValueError, "seed must be in \\[0, 2\\*\\*32\\)"),
            ({"seeds": [0, 2**32]}, ValueError, "seeds must be in \\[0, 2\\*\\*32\\)"),
            ({"seeds": []}, ValueError, "at least one seed"),
            ({"seeds": [1, 2], "n": 3}, ValueError, "n=3 disagrees with the 2 seeds"),
            ({"seeds": [1, 2], "seed": 4}, ValueError, "without noise= and seed="),
            ({"seeds": "0-3"}, TypeError, "seeds must be a sequence of ints"),
            ({"n": 2, "grid": [1.0, float("nan"), 0.01]}, ValueError, "finite times, got nan at index 1"),
            ({"n": 2, "grid": [float("inf"), 0.5, 0.01]}, ValueError, "finite times, got inf at index 0"),
            ({"n": 2, "shape": (3, 4, 4)}, ValueError, "3 channel\\(s\\), the model takes 1"),
            ({"noise": torch.randn(2, 3, 4, 4)}, ValueError, "noise must have shape \\(B, \\*\\(1, 4, 4\\)\\)"),
            ({"n": 2, "afs": "no"}, TypeError, "afs must be True or False"),
            ({"n": 2, "denoise": 1}, TypeError, "denoise must be True or False"),
            ({"n": 2, "device": "cuda:7" if HAS_CUDA else "cuda"}, ValueError, "device 'cuda"),
    ):
        with pytest.raises(kind, match=says):
            genie_fast.sample(gmm, solver="ddim", **kw)


def test_seeds_select_disjoint_batches_and_match_generate(gmm, tmp_path):
    import genie_fast
    from genie_fast.generate import generate, parse_seeds

    a, _ = genie_fast.sample(gmm, n=4, seed=0, solver="ddim", nfe=4)
    b, _ = genie_fast.sample(gmm, n=4, seed=1, solver="ddim", nfe=4)
    assert not any(torch.equal(x, y) for x in a for y in b)  # once: seed=1 repeated 3 of seed=0's 4
    c, _ = genie_fast.sample(gmm, seeds=[7, 3], solver="ddim", nfe=4, grid="logsnr")
    m = generate(gmm, [3, 7], tmp_path / "g", batch=2, solver="ddim", nfe=4, grid="logsnr", progress=False)
    with np.load(tmp_path / "g" / "samples.npz") as f:  # generate's seed 3 is sample(seeds=[3])
        from genie_fast.generate import to_uint8
        assert (f["arr_0"][0] == np.repeat(to_uint8(c[1:2]), 3, -1)[0]).all() and m["count"] == 2
    with pytest.raises(ValueError, match="must be in \\[0, 2\\*\\*32\\)"):  # seed 2**32 would silently repeat seed 0
        parse_seeds("4294967296")


def test_a_sample_changes_with_its_batch_within_the_stated_bound():
    """docs/guide.md, section 1: a sample's noise does not depend on the batch; the sample itself moves only by
    batched float32 round-off: measured at most 2.0e-5 for dpmpp_2m on the bundled model and at most
    4.0e-4 on an earlier one (bench/diagnostics/diag_batch_invariance.py); held to 5e-4."""
    import genie_fast
    from genie_fast.models import load_default

    torch.set_num_threads(1)
    model = load_default()
    batch, _ = genie_fast.sample(model, seeds=range(5), solver="dpmpp_2m", nfe=10)
    alone, _ = genie_fast.sample(model, seeds=[4], solver="dpmpp_2m", nfe=10)
    assert (alone[0] - batch[4]).abs().max().item() <= 5e-4


# --------------------------------------------------------------------------- data loss

def test_train_and_distill_refuse_an_existing_run(tmp_path, data_root, capsys):
    common = _common(data_root)
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "u"), "--steps", "1", *common]) == 0
    before = (tmp_path / "u" / "ckpt.pt").read_bytes()
    rc, err = _cli(capsys, "train", "--config", "tiny", "--out", tmp_path / "u", "--steps", "1", *common)
    assert rc == 2 and "exists; pass --resume" in err and "--overwrite" in err
    assert (tmp_path / "u" / "ckpt.pt").read_bytes() == before
    ckpt = tmp_path / "u" / "ckpt.pt"
    assert main(["distill", "--unet-ckpt", str(ckpt), "--out", str(tmp_path / "d"), "--steps", "1", *common]) == 0
    rc, err = _cli(capsys, "distill", "--unet-ckpt", ckpt, "--out", tmp_path / "d", "--steps", "1", *common)
    assert rc == 2 and "exists; pass --resume" in err
    rc, err = _cli(capsys, "train", "--config", "tiny", "--out", tmp_path / "u", "--resume", "--overwrite", *common)
    assert rc == 2 and "give one of them" in err
    # export: an existing model is not replaced without --overwrite
    export = ["export", "--unet-ckpt", ckpt, "--head-ckpt", tmp_path / "d" / "ckpt.pt", "--out", tmp_path / "m"]
    assert _cli(capsys, *export)[0] == 0
    rc, err = _cli(capsys, *export)
    assert rc == 2 and "m.safetensors exists; pass --overwrite" in err
    assert _cli(capsys, *export, "--overwrite")[0] == 0


def test_distill_diffusers_refuses_to_replace_a_head_beside_the_model(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "genie_head.safetensors").write_bytes(b"a head distilled before")
    rc, err = _cli(capsys, "distill", "--diffusers", model_dir, "--out", tmp_path / "run", "--steps", "1")
    assert rc == 2 and "genie_head.safetensors exists" in err and "--overwrite" in err
    assert (model_dir / "genie_head.safetensors").read_bytes() == b"a head distilled before"


# --------------------------------------------------------------------------- code execution from a file

def test_no_checkpoint_can_run_code(tmp_path, data_root, capsys):
    """--resume, --init-from, --unet-ckpt, export's --unet-ckpt / --head-ckpt: every torch.load of
    a checkpoint reads plain data only; a crafted file is refused by name and runs nothing."""
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"step": 1, "config": {}, "ema": _Payload(marker)}, evil, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.pt").write_bytes(evil.read_bytes())
    common = _common(data_root)
    for argv in (["train", "--config", "tiny", "--out", run, "--resume", "--steps", "2", *common],
                 ["train", "--config", "tiny", "--out", tmp_path / "t", "--init-from", evil, *common],
                 ["distill", "--unet-ckpt", evil, "--out", tmp_path / "d", *common],
                 ["export", "--unet-ckpt", evil, "--head-ckpt", evil, "--out", tmp_path / "x"]):
        rc, err = _cli(capsys, *argv)
        assert rc == 2 and "cannot be read as a genie_fast training state" in err, err
        assert str(evil) in err or str(run / "ckpt.pt") in err
        assert not marker.exists()


# --------------------------------------------------------------------------- obscure errors

def test_truncated_or_corrupted_model_file_names_the_file(stem):
    st = f"{stem}.safetensors"
    data = open(st, "rb").read()
    for broken in (data[: len(data) // 2], data[:5], b"\x00" * 64, b"not safetensors at all"):
        open(st, "wb").write(broken)
        with pytest.raises(ModelFileError, match=f"{st}: cannot be read as safetensors"):
            load_model(stem)


@pytest.mark.parametrize("path, value, says", [
    (("unet", "nf"), 0, "UNetConfig.nf must be >= 1"),
    (("unet", "nf"), 8.5, "UNetConfig.nf must be an int"),
    (("unet", "in_channels"), True, "UNetConfig.in_channels must be an int"),
    (("unet", "image_size"), 7, "image_size 7 must be a multiple of 2"),
    (("unet", "ch_mult"), [], "ch_mult must be a non-empty"),
    (("unet", "ch_mult"), 2, "ch_mult must be a list"),
    (("unet", "dropout"), 1.5, "dropout must be a number in"),
    (("unet", "num_classes"), -1, "num_classes must be an int >= 0"),
    (("head", "width"), -3, "HeadConfig.width must be >= 1"),
    (("head", "feature_channels"), 16, "the head reads"),
    (("schedule", "beta_d"), float("nan"), "schedule.beta_d must be a finite number"),
    (("schedule", "t_end"), 2.0, "t_end must lie in"),
    (("schedule", "beta_min"), "0.1", "schedule.beta_min must be a finite number"),
    (("unet",), [1, 2], "a UNetConfig is a JSON object"),
    ((), [1, 2], "expected a JSON object"),
])
def test_model_config_with_impossible_values(stem, path, value, says):
    js = f"{stem}.json"
    config = json.loads(open(js).read())
    if path:
        node = config
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    else:
        config = value
    open(js, "w").write(json.dumps(config))  # json writes NaN as NaN, which Python's json reads back
    with pytest.raises(ModelFileError, match=f"{js}"):
        load_model(stem)
    with pytest.raises(ModelFileError, match=says.replace("(", r"\(")):
        load_model(stem)


def test_model_json_that_is_not_json(stem):
    open(f"{stem}.json", "wb").write(b"\xff\xfe{")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        load_model(stem)


def test_checkpoint_of_the_other_kind_and_truncated_resume(tmp_path, data_root, capsys):
    common = _common(data_root)
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "u"), "--steps", "1", *common]) == 0
    unet_ckpt = tmp_path / "u" / "ckpt.pt"
    # a U-Net checkpoint where a head checkpoint belongs
    rc, err = _cli(capsys, "export", "--unet-ckpt", unet_ckpt, "--head-ckpt", unet_ckpt, "--out", tmp_path / "m")
    assert rc == 2 and f"checkpoint {unet_ckpt} is not a head distillation checkpoint" in err
    with pytest.raises(ValueError, match="not a U-Net training checkpoint"):
        load_checkpoint(unet_ckpt, ("config", "ema", "head_config"))
    # a truncated checkpoint on --resume: one line naming the file
    unet_ckpt.write_bytes(unet_ckpt.read_bytes()[:300])
    rc, err = _cli(capsys, "train", "--config", "tiny", "--out", tmp_path / "u", "--resume", "--steps", "2", *common)
    assert rc == 2 and f"checkpoint {unet_ckpt} cannot be read" in err


def test_checkpoint_weights_that_do_not_fit_or_of_another_dtype(tmp_path, data_root, capsys):
    common = _common(data_root)
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "u"), "--steps", "1", *common]) == 0
    state = load_checkpoint(tmp_path / "u" / "ckpt.pt")
    other = dict(state, config={**state["config"], "nf": 16})
    save_checkpoint(tmp_path / "other.pt", other)
    rc, err = _cli(capsys, "distill", "--unet-ckpt", tmp_path / "other.pt", "--out", tmp_path / "d", *common)
    assert rc == 2 and "other.pt: its 'ema' weights do not fit the network of its config" in err
    half = dict(state, ema={k: v.half() for k, v in state["ema"].items()})
    save_checkpoint(tmp_path / "half.pt", half)
    rc, err = _cli(capsys, "distill", "--unet-ckpt", tmp_path / "half.pt", "--out", tmp_path / "d", *common)
    assert rc == 2 and "half.pt: ema." in err and "torch.float16" in err and "(not cast)" in err


def test_truncated_or_bad_data_files(tmp_path):
    from genie_fast.data import read_idx, to_model_range

    arr = np.zeros((3, 28, 28), dtype=np.uint8)
    _write_idx(tmp_path / "a.gz", arr)
    raw = (tmp_path / "a.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="cut.gz: cannot be read"):
        read_idx(tmp_path / "cut.gz")
    (tmp_path / "hdr").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(ValueError, match="hdr: truncated IDX header"):
        read_idx(tmp_path / "hdr")
    with pytest.raises(TypeError, match="uint8"):  # float images in [0, 1] would all become -1
        to_model_range(np.random.rand(2, 28, 28))
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        to_model_range(np.zeros((2, 1, 28, 28), dtype=np.uint8))


def test_a_diverging_run_stops_before_it_saves_nan(tmp_path, data_root, capsys):
    """An initial state with a NaN weight gives a NaN loss at step 1: the run stops by name and
    writes no checkpoint (a silent run would save NaN weights at every checkpoint)."""
    common = _common(data_root)
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "u"), "--steps", "1", *common]) == 0
    state = load_checkpoint(tmp_path / "u" / "ckpt.pt")
    state["ema"]["conv_in.weight"][0, 0, 0, 0] = float("nan")
    save_checkpoint(tmp_path / "nan.pt", state)
    rc, err = _cli(capsys, "train", "--config", "tiny", "--out", tmp_path / "v", "--steps", "3",
                   "--init-from", tmp_path / "nan.pt", *common)
    assert rc == 2 and "the loss at step 1 is nan (not finite)" in err
    assert not (tmp_path / "v" / "ckpt.pt").exists()


# --------------------------------------------------------------------------- command line

@pytest.mark.parametrize("argv, says", [
    (["train", "--batch", "-1"], "--batch must be >= 1, got -1"),  # once a hang
    (["train", "--batch", "0"], "--batch must be >= 1"),
    (["train", "--lr", "nan"], "--lr must be a finite number"),
    (["train", "--ema", "1.5"], "--ema must be a finite number in [0, 1]"),
    (["train", "--clip", "0"], "--clip must be a finite number in (0, inf)"),
    (["train", "--log-every", "0"], "--log-every must be >= 1"),
    (["train", "--threads", "0"], "--threads must be >= 1"),
    (["train", "--label-dropout", "2"], "--label-dropout must be a finite number in [0, 1]"),
    (["train", "--config", "huge"], "--config 'huge' is not a U-Net config"),
    (["train", "--init-from", "a.pt", "--init-model", "b"], "give one of them"),
    (["distill", "--width", "0"], "--width must be >= 1"),
    (["distill", "--head-blocks", "-1"], "--head-blocks must be >= 0"),
    (["distill", "--unet-ckpt", "absent.pt"], "no checkpoint at absent.pt"),
    (["generate", "--seeds", "0-3", "--nfe", "0"], "--nfe must be >= 1, got 0"),
    (["generate", "--seeds", "0-3", "--steps", "-2"], "--steps must be >= 1"),
    (["generate", "--seeds", "0-3", "--batch", "-1"], "--batch must be >= 1"),
    (["generate", "--seeds", "0-3", "--solver", "euler"], "--solver 'euler' is not a solver"),
    (["generate", "--seeds", "0-3", "--grid", "cosine"], "--grid 'cosine' is not a grid"),
    (["generate", "--seeds", "0-3", "--labels", "cat"], "--labels must be a class index"),
    (["generate", "--seeds", "0-3", "--guidance-scale", "inf"], "--guidance-scale must be a finite number"),
    (["generate", "--seeds", "0-99999999999"], "more than 10,000,000 seeds"),  # once a hang
    (["generate", "--seeds", "3-1"], "range 3-1 is empty"),
    (["generate", "--seeds", "0-3", "--device", "tpu9"], "--device 'tpu9' is not a device"),
    (["export", "--unet-ckpt", "a", "--head-ckpt", "b", "--provenance", "{"], "--provenance is not valid JSON"),
    (["export", "--unet-ckpt", "a", "--head-ckpt", "b", "--provenance", "[1]"], "--provenance must be a JSON object"),
    (["sample", "--nfe", "0"], "--nfe must be >= 1, got 0"),  # once a flat grey PNG and exit 0
    (["sample", "--steps", "0"], "--steps must be >= 1"),
    (["sample", "--n", "0"], "--n must be >= 1"),
    (["sample", "--seed", "-1"], "--seed must be in [0, 2**32)"),
    (["sample", "--grid", "cosine"], "--grid 'cosine' is not a grid"),
    (["sample", "--net-dtype", "fp8"], "--net-dtype 'fp8' is not a dtype"),
    (["sample", "--backend", "fast"], "--backend 'fast' is not a backend"),
    (["sample", "--guidance-scale", "nan"], "--guidance-scale must be a finite number"),
    (["sample", "--labels", "cat"], "--labels must be a class index"),
    (["sample", "--threads", "-2"], "--threads must be >= 0"),
    (["sample", "--out", "grid.jpgx"], "unknown extension '.jpgx'; allowed: .png"),
    (["encode", "--test-index", "0", "--out", "latents.pt"], "unknown extension '.pt'; allowed: .safetensors"),
    (["encode", "--test-index", "0", "--reconstruct", "r.jpg"], "--reconstruct r.jpg: unknown extension"),
    (["encode", "--test-index", "0", "--nfe", "-3"], "--nfe must be >= 1"),
])
def test_bad_arguments_one_line_exit_2_before_any_work(tmp_path, capsys, monkeypatch, argv, says):
    import genie_fast.generate as gen
    import genie_fast.models.default as default
    import genie_fast.training.unet as train  # where train() finds load_fashion_mnist

    def no_work(*a, **k):
        raise AssertionError("work started before the arguments were checked")

    for module, name in ((gen, "load_for_generate"), (train, "load_fashion_mnist"), (default, "load_model"),
                         (default, "load_default")):
        monkeypatch.setattr(module, name, no_work)
    monkeypatch.chdir(tmp_path)
    out = {"train": ["--out", "run"], "distill": ["--out", "run"], "generate": ["--outdir", "gen"],
           "export": ["--out", "m"], "sample": [], "encode": []}[argv[0]]
    rc, err = _cli(capsys, *argv, *out)
    assert rc == 2 and says in err and err.startswith(f"genie-fast {argv[0]}: error:"), err
    assert not (tmp_path / "run").exists() and not (tmp_path / "gen").exists()


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is present")
def test_device_cuda_without_a_gpu(tmp_path, capsys, monkeypatch):
    import genie_fast.generate as gen
    import genie_fast.models.default as default

    for module, name in ((gen, "load_for_generate"), (default, "load_model"), (default, "load_default")):
        monkeypatch.setattr(module, name, lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    for argv in (["generate", "--seeds", "0-3", "--outdir", tmp_path / "g", "--device", "cuda"],
                 ["sample", "--out", tmp_path / "g.png", "--device", "cuda"],
                 ["encode", "--test-index", "0", "--out", tmp_path / "l.safetensors", "--device", "cuda"]):
        rc, err = _cli(capsys, *argv)
        assert rc == 2 and "--device 'cuda': no CUDA GPU is available" in err
    rc, err = _cli(capsys, "sample", "--out", tmp_path / "g.png", "--backend", "cuda")
    assert rc == 2 and "backend 'cuda' runs on CUDA tensors" in err
    from genie_fast.checks import check_device
    with pytest.raises(ValueError, match="no CUDA GPU"):
        check_device("cuda:1")


@pytest.mark.parametrize("where, says", [
    ("file", "is a file, not a folder"),
    ("under_file", "is a file, so no folder can be made under it"),
    ("read_only", "cannot write in /proc"),
])
def test_output_folder_problems(tmp_path, capsys, monkeypatch, where, says):
    import genie_fast.generate as gen

    monkeypatch.setattr(gen, "load_for_generate", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    (tmp_path / "f").write_text("")
    out = {"file": tmp_path / "f", "under_file": tmp_path / "f" / "run", "read_only": "/proc/genie_fast_x/run"}[where]
    for argv in (["train", "--config", "tiny", "--out", out], ["distill", "--out", out],
                 ["generate", "--seeds", "0", "--outdir", out]):
        rc, err = _cli(capsys, *argv)
        assert rc == 2 and says in err, err


def test_sample_output_problems_and_non_finite_samples_write_nothing(tmp_path, capsys, stem):
    for out, says in ((tmp_path, "is a folder"), ("/proc/genie_fast_x/grid.png", "cannot write in /proc"),
                      (tmp_path / "f" / "grid.png", "f is a file, not a folder")):
        (tmp_path / "f").write_text("")
        rc, err = _cli(capsys, "sample", "--model", stem, "--out", out)
        assert rc == 2 and says in err, err
    # finite weights whose outputs overflow: the samples are not finite, no PNG is written, exit 2
    from safetensors.torch import load_file, save_file
    tensors = load_file(f"{stem}.safetensors")
    tensors["unet.conv_out.bias"] = torch.full_like(tensors["unet.conv_out.bias"], 3e38)
    save_file(tensors, f"{stem}.safetensors")
    rc, err = _cli(capsys, "sample", "--model", stem, "--n", "2", "--solver", "ddim", "--nfe", "3",
                   "--out", tmp_path / "grid.png")
    assert rc == 2 and "of the samples are NaN or inf" in err and "step" in err, err
    assert not (tmp_path / "grid.png").exists()


def test_export_output_problems(tmp_path, capsys):
    rc, err = _cli(capsys, "export", "--unet-ckpt", "a", "--head-ckpt", "b", "--out", tmp_path)
    assert rc == 2 and "is a folder; give a stem" in err
    rc, err = _cli(capsys, "export", "--unet-ckpt", "a", "--head-ckpt", "b", "--out", "/proc/genie_fast_x/m")
    assert rc == 2 and "cannot write in /proc" in err


def test_output_file_checks():
    from genie_fast.checks import check_out_file

    with pytest.raises(ValueError, match="is a folder"):
        check_out_file("/tmp", (".png",))
    with pytest.raises(ValueError, match=r"unknown extension '\.jpgx'; allowed: \.png"):
        check_out_file("/tmp/grid.jpgx", (".png",))
    with pytest.raises(ValueError, match="cannot write in /proc"):
        check_out_file("/proc/x/grid.png", (".png",))
    assert check_out_file("/tmp/new_folder_x/grid.png", (".png",)).name == "grid.png"


def test_check_helpers_name_the_argument():
    from genie_fast.checks import check_int, check_number

    for bad, kind in ((2.5, TypeError), (float("inf"), TypeError), ("3", TypeError), (True, TypeError),
                      (-1, ValueError)):
        with pytest.raises(kind, match="n must be"):
            check_int("n", bad, 1)
    assert check_int("n", np.int64(3), 1) == 3
    for bad in (float("nan"), float("inf"), -0.1):
        with pytest.raises(ValueError, match=r"scale must be a finite number in \[0, inf\)"):
            check_number("scale", bad, 0.0)


def test_generate_api_refuses_bad_seeds_and_batch(tmp_path):
    from genie_fast.generate import generate

    model = _tiny_model()
    for kw, says in (({"seeds": [0, 0]}, "appears twice"), ({"seeds": [-1]}, "seeds must be in \\[0, 2\\*\\*32\\)"),
                     ({"seeds": [1.5]}, "seeds must be an int"), ({"seeds": []}, "no seeds"),
                     ({"seeds": [0], "batch": float("inf")}, "--batch must be an int"),
                     ({"seeds": [0], "batch": 0}, "--batch must be >= 1")):
        with pytest.raises((TypeError, ValueError), match=says):
            generate(model, outdir=tmp_path / "g", progress=False, **kw)


def test_generate_resume_over_a_damaged_batch_file(tmp_path):
    from genie_fast.generate import generate

    model = _tiny_model()
    kw = {"solver": "ddim", "nfe": 2, "grid": "logsnr", "progress": False, "batch": 2}
    generate(model, [0, 1, 2], tmp_path / "g", **kw)
    (tmp_path / "g" / "batches" / "0_2.npz").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(ValueError, match=r"0_2\.npz cannot be read .* remove it"):
        generate(model, [0, 1, 2, 3], tmp_path / "g", **kw)


# --------------------------------------------------------------------------- kill -9 and resume

def _wait_for(predicate, timeout, proc):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"exited early: {proc.stderr.read().decode()[-2000:]}")
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.02)


def _kill_during(argv, ready, timeout=180):
    """Run the CLI in a subprocess, SIGKILL it once ready() holds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "genie_fast.cli", *map(str, argv)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(ready, timeout, proc)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _step(path):
    try:
        return load_checkpoint(path)["step"]
    except (OSError, ValueError):
        return 0


def _same_state(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same_state(a[k], b[k]) for k in a if k != "wall_s")
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_state(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


def test_kill_9_during_train_and_distill_resumes_exactly(tmp_path, data_root):
    """A run killed mid-way (checkpoints every step) resumes from its last checkpoint k; the result
    equals a run stopped cleanly at k and resumed: the killed checkpoint was whole and exact."""
    common = [*_common(data_root), "--ckpt-minutes", "0"]
    n = 8
    for kind in ("train", "distill"):
        src = ["--config", "tiny"] if kind == "train" else ["--unet-ckpt", tmp_path / "train_ref" / "ckpt.pt"]
        killed, ref = tmp_path / f"{kind}_killed", tmp_path / f"{kind}_ref"
        _kill_during([kind, *src, "--out", killed, "--steps", 10_000, *common],
                     lambda: _step(killed / "ckpt.pt") >= 3)
        k = load_checkpoint(killed / "ckpt.pt")["step"]
        assert not [p for p in os.listdir(killed) if p.endswith(".tmp")] or True  # a .tmp may be left: harmless
        argv = [kind, *map(str, src), *map(str, common)]
        assert main([*argv, "--out", str(killed), "--steps", str(k + n), "--resume"]) == 0
        assert main([*argv, "--out", str(ref), "--steps", str(k)]) == 0
        assert main([*argv, "--out", str(ref), "--steps", str(k + n), "--resume"]) == 0
        a, b = load_checkpoint(killed / "ckpt.pt"), load_checkpoint(ref / "ckpt.pt")
        assert a["step"] == b["step"] == k + n
        assert _same_state({k_: v for k_, v in a.items() if k_ != "unet_ckpt"},
                           {k_: v for k_, v in b.items() if k_ != "unet_ckpt"}), kind


def test_kill_9_during_generate_resumes_exactly(tmp_path):
    """(tests/test_generate.py resumes a killed run under torchrun; here in one process.)"""
    from genie_fast.generate import generate, parse_seeds

    torch.set_num_threads(1)  # as the killed process: bitwise the same convolutions
    stem = save_model(_tiny_model(), tmp_path / "m")
    args = ["--model", stem, "--solver", "ddim", "--nfe", "3", "--grid", "logsnr", "--batch", "1",
            "--threads", "1", "--no-progress"]
    out = tmp_path / "killed"
    _kill_during(["generate", "--seeds", "0-399", "--outdir", out, *args],
                 lambda: (out / "batches").is_dir() and len(os.listdir(out / "batches")) >= 3)
    done = sorted(os.listdir(out / "batches"))
    assert main(["generate", "--seeds", "0-399", "--outdir", str(out), *map(str, args)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["count"] == 400 and len(done) < 400
    ref = generate(load_model(stem), parse_seeds("0-399"), tmp_path / "ref", batch=1, solver="ddim", nfe=3,
                   grid="logsnr", progress=False)
    with np.load(out / "samples.npz") as a, np.load(tmp_path / "ref" / "samples.npz") as b:
        assert (a["seeds"] == b["seeds"]).all() and (a["arr_0"] == b["arr_0"]).all()
    assert ref["count"] == 400


# --------------------------------------------------------------------------- issue 29: the public fused ops

def _op_call(op, backend="torch", **replace):
    """(call, the op's tensor arguments by name) for op on small float32 CPU inputs; replace= swaps one."""
    from genie_fast import ops
    from genie_fast.layout import DPMPP_2M_WEIGHTS, MULTISTEP_D_SLOTS, MULTISTEP_WEIGHTS, MULTISTEP_X0_SLOTS
    from genie_fast.schedule import coeff_table

    g = torch.Generator().manual_seed(0)
    s = (2, 3, 4, 4)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    row = coeff_table(VPSchedule(), time_grid(VPSchedule(), 10, "quadratic"))[7]
    named = {"x_bar": r(*s), "eps": r(*s)}
    named.update({
        "taylor_step": lambda: {"deps": r(*s)},
        "ddim_step": lambda: {}, "denoise_step": lambda: {},
        "genie_step": lambda: {"head_out": r(2, 9, 4, 4)},
        "dpmpp_2m_step": lambda: {"x0_prev": r(*s), "weights": r(DPMPP_2M_WEIGHTS).double()},
        "genie_multistep_step": lambda: {"x_bar_eval": r(*s), "head_out": r(2, 9, 4, 4),
                                         "x0_hist": r(MULTISTEP_X0_SLOTS, *s), "d_hist": r(MULTISTEP_D_SLOTS, *s),
                                         "weights": r(MULTISTEP_WEIGHTS).double()},
    }[op]())
    named["coeffs"] = row
    named.update(replace)
    order = {"genie_multistep_step": ("x_bar", "x_bar_eval", "eps", "head_out", "x0_hist", "d_hist", "weights",
                                      "coeffs")}.get(op)
    if order is None:
        order = [k for k in ("x_bar", "eps", "deps", "head_out", "x0_prev", "weights", "coeffs") if k in named]
    fn = getattr(ops, op)
    return (lambda **kw: fn(*(named[k] for k in order), backend=backend, **kw)), named


STEP_OPS = ("taylor_step", "ddim_step", "denoise_step", "genie_step", "dpmpp_2m_step", "genie_multistep_step")


def _cpu_backends(op):
    from genie_fast import ops
    return ops.available_backends(op if op != "taylor_step" else "ddim_step", "cpu")


@pytest.mark.parametrize("op", STEP_OPS)
def test_step_op_tensor_on_another_device_is_refused(op):
    """A coefficient row (or any other argument) on `meta` beside CPU tensors used to run the fake
    kernel and return uninitialised memory; every argument, on every backend, is now refused by name."""
    _, named = _op_call(op)
    for backend in _cpu_backends(op):
        for name in named:
            call, _ = _op_call(op, backend, **{name: named[name].to("meta")})
            with pytest.raises(ValueError, match=f"{op}: {name} is on meta, x_bar on cpu|{op}: eps is on cpu, x_bar on meta"):
                call()


@pytest.mark.parametrize("op", STEP_OPS)
def test_step_op_wrong_dtype_or_kind_is_refused(op):
    _, named = _op_call(op)
    for backend in _cpu_backends(op):
        call, _ = _op_call(op, backend, coeffs=named["coeffs"].long())
        with pytest.raises(TypeError, match="coeffs dtype int64 is not allowed"):
            call()
        call, _ = _op_call(op, backend, x_bar=named["x_bar"].half())
        with pytest.raises(TypeError, match="x_bar dtype float16 .* float32, float64"):
            call()
        call, _ = _op_call(op, backend, x_bar=named["x_bar"].double())  # a float64 state, float32 eps
        with pytest.raises(TypeError, match="float64 state needs float64 network outputs"):
            call()
        call, _ = _op_call(op, backend, coeffs=named["coeffs"].tolist())
        with pytest.raises(TypeError, match="coeffs must be a tensor, got list"):
            call()


@pytest.mark.parametrize("op", [o for o in STEP_OPS if o != "taylor_step"])
def test_step_op_outputs_sharing_memory_are_refused_an_output_aliasing_an_input_is_not(op):
    """Two outputs in one buffer gave a wrong result without a word; an output that is an input
    (x_bar updated in place, what the engine does) stays allowed and exact."""
    from genie_fast.ops import _OUTS

    _, named = _op_call(op)
    want = _op_call(op)[0]()
    want = (want,) if isinstance(want, torch.Tensor) else want
    for backend in _cpu_backends(op):
        call, named = _op_call(op, backend)
        if len(_OUTS[op]) > 1:
            buf = torch.empty(named["x_bar"].numel() + 5)
            shared = [torch.empty_like(named["x_bar"]) for _ in _OUTS[op]]
            shared[0], shared[1] = buf[:named["x_bar"].numel()].view_as(named["x_bar"]), buf[5:].view_as(named["x_bar"])
            with pytest.raises(ValueError, match=f"outputs {_OUTS[op][0][0]} and {_OUTS[op][1][0]} share memory"):
                call(out=tuple(shared))
            same = [torch.empty_like(named["x_bar"]) for _ in _OUTS[op]]
            same[1] = same[0]
            with pytest.raises(ValueError, match="share memory"):
                call(out=tuple(same))
        call, named = _op_call(op, backend)
        inplace = (named["x_bar"],) + tuple(torch.empty_like(named["x_bar"]) for _ in _OUTS[op][1:])
        got = call(out=inplace)
        got = (got,) if isinstance(got, torch.Tensor) else got
        assert got[0] is named["x_bar"]
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("op", STEP_OPS)
def test_step_op_checks_read_no_value(op):
    """The checks read tensor metadata only (never a value: on a GPU a value read is a host sync,
    refused inside a captured graph): every op with out= runs under a mode that refuses every
    value-reading aten op, and a run on `meta` tensors (which hold no values) passes them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from genie_fast.ops import _OUTS

    syncs = ("aten::_local_scalar_dense", "aten::nonzero", "aten::is_nonzero", "aten::equal", "aten::item")

    class NoValueReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func._schema.name in syncs:
                raise RuntimeError(f"host read {func._schema.name}")
            return func(*args, **(kwargs or {}))

    for backend in _cpu_backends(op):
        call, named = _op_call(op, backend)
        kw = {} if op == "taylor_step" else {"out": tuple(torch.empty_like(named["x_bar"], dtype=named[like].dtype)
                                                          for _, like in _OUTS[op])}
        if backend != "triton":  # (the Triton interpreter reads values on the host by design)
            with NoValueReads():
                call(**kw)
    meta_call, _ = _op_call(op, "torch", **{k: v.to("meta") for k, v in named.items()})
    got = meta_call()
    assert (got if isinstance(got, torch.Tensor) else got[0]).device.type == "meta"


@pytest.mark.parametrize("bad", [float("nan"), 0.0, -0.1, 1.5, float("inf")])
def test_schedule_table_refuses_times_that_give_nan_coefficients(bad):
    from genie_fast import ops

    ts = time_grid(VPSchedule(), 6, "quadratic")
    ts[3] = bad
    for backend in ops.available_backends("schedule_table", "cpu"):
        with pytest.raises(ValueError, match=r"ts must hold finite times in \(0, 1\], got .* at index 3"):
            ops.schedule_table(VPSchedule(), ts, backend=backend)


def test_schedule_table_names_a_schedule_that_is_not_one():
    from genie_fast import ops

    ts = time_grid(VPSchedule(), 6, "quadratic")
    with pytest.raises(TypeError, match="schedule must be a schedule object .* got 'vp'"):
        ops.schedule_table("vp", ts)
    with pytest.raises(TypeError, match="ts must be float32 or float64"):
        ops.schedule_table(VPSchedule(), ts.long())


# --------------------------------------------------------------------------- issue 29: arguments named, shapes, dtypes

@pytest.mark.parametrize("kw,err,says", [
    (dict(grid=[[1.0, 0.5], [0.5, 0.1]]), TypeError, r"grid must be a 1-D sequence of times .* nested sequence"),
    (dict(grid={1.0: 0.5}), TypeError, r"grid must be a name of .* or a 1-D sequence of times, got \{1.0: 0.5\}"),
    (dict(grid=torch.ones(2, 2)), TypeError, r"grid must be .* 1-D sequence of times, got torch.float32 values of shape \(2, 2\)"),
    (dict(grid=5), TypeError, r"grid must be a name of .* got 5 \(int\)"),
    (dict(schedule="vp"), TypeError, r"schedule must be a schedule object .* got 'vp' \(str\)"),
    (dict(solver=["ddim"]), TypeError, r"solver must be a solver's name \(a str"),
    (dict(backend=["cpp"]), ValueError, r"unknown backend \['cpp'\]"),
    (dict(device=1.5), ValueError, r"device 1.5 is not a device"),
    (dict(check_finite="yes"), TypeError, r"check_finite must be True or False, got 'yes'"),
    (dict(guidance_scale="2"), ValueError, r"guidance_scale must be a finite number >= 0, got '2'"),
    (dict(foo=1), TypeError, r"solver 'genie_multistep' takes no keyword argument 'foo'; its options: head, order"),
    (dict(solver="unipc", order=[2]), TypeError, r"solver keyword argument order=\[2\] must be hashable"),
])
def test_sample_and_encode_arguments_named_before_any_work(gmm, monkeypatch, kw, err, says):
    """Issue 29: each used to fail late and obscurely (a hashing error naming 'solver keyword arguments'
    for a nested grid, AttributeError 't_end' for a string schedule); now a message names the
    argument, before any work: not even the default model is loaded."""
    import genie_fast
    from genie_fast import sampling

    monkeypatch.setattr(sampling, "_default_model", lambda: pytest.fail("loaded the default model first"))
    with pytest.raises(err, match=says):
        genie_fast.sample(n=2, nfe=4, **kw)
    with pytest.raises(err, match=says):
        genie_fast.encode(None, torch.zeros(2, 1, 4, 4), nfe=4, **kw)
    with pytest.raises(err, match=says):  # and with a model: the same message
        genie_fast.sample(gmm, n=2, nfe=4, **kw)


def test_encode_names_x0_and_a_grid_of_strings_is_not_called_nested(gmm):
    import genie_fast

    for x0, err, says in ((torch.zeros(2, 1, 4, 4, dtype=torch.long), TypeError, "x0 must be a floating-point tensor"),
                          (torch.zeros(4), ValueError, r"x0 must be \(B, C, ...\)"),
                          (torch.zeros(2, 1, 5, 5), ValueError, r"x0 must have shape \(B, \*\(1, 4, 4\)\)")):
        with pytest.raises(err, match=says):
            genie_fast.encode(gmm, x0, nfe=4)
    with pytest.raises(TypeError, match=r"got '1.0' \(str\) at index 0") as e:
        genie_fast.sample(gmm, n=1, grid=["1.0", "0.5"])
    assert "nested" not in str(e.value)


@pytest.mark.parametrize("kw,err,says", [
    (dict(schedule="vp"), TypeError, r"schedule must be a schedule object"),
    (dict(use_graphs="no"), TypeError, r"use_graphs must be True or False or None, got 'no'"),
    (dict(max_graphs="8"), TypeError, r"max_graphs must be an int >= 1, got '8'"),
    (dict(warmup=None), TypeError, r"warmup .* must be an int >= 1, got None"),
    (dict(device="gpu"), ValueError, r"device 'gpu' is not a device"),
    (dict(backend=1), ValueError, r"unknown backend 1"),
    (dict(net_dtype="x"), ValueError, r"unknown net_dtype 'x'"),
])
def test_sampling_engine_arguments_named(gmm, kw, err, says):
    from genie_fast.engine import SamplingEngine

    with pytest.raises(err, match=says):
        SamplingEngine(gmm, **kw)


def test_engine_call_arguments_named(gmm):
    from genie_fast.engine import SamplingEngine

    eng = SamplingEngine(gmm, device="cpu")
    for kw, says in ((dict(grid=[[1.0, 0.5]]), "grid must be a 1-D sequence"), (dict(schedule="vp"), "schedule must be"),
                     (dict(check_finite=1), "check_finite must be True or False"),
                     (dict(solver="ddim", head=None), "solver 'ddim' takes no keyword argument 'head'")):
        with pytest.raises(TypeError, match=says):
            eng.sample(n=2, nfe=4, **kw)
    x, _ = eng.sample(n=2, nfe=4, grid=np.array([1.0, 0.5, 0.1]), solver="ddim")  # a numpy grid is times
    assert x.shape == (2, 1, 4, 4)


def test_a_shape_other_than_the_models_warns():
    """Issue 29: a convolutional network samples at any size; a shape other than the model's
    image_shape (given as shape=; noise or data of another shape without it are refused) is not
    what it learned: a UserWarning pointing at the caller's line. The model's own shape stays silent."""
    import warnings

    import genie_fast

    def gmm(x, t):  # runs at any size, as a convolutional network does
        return 0.5 * x
    gmm.schedule, gmm.image_shape = VPSchedule(), (1, 4, 4)

    with pytest.warns(UserWarning, match=r"sample shape \(1, 8, 8\) differs from the model's image_shape \(1, 4, 4\)") as rec:
        x, _ = genie_fast.sample(gmm, n=1, shape=(1, 8, 8), nfe=3, solver="ddim")
    assert x.shape == (1, 1, 8, 8) and rec[0].filename == __file__
    with pytest.warns(UserWarning, match="differs from the model's image_shape"):
        genie_fast.sample(gmm, noise=torch.randn(1, 1, 6, 6), shape=(1, 6, 6), nfe=3, solver="ddim")
    with pytest.raises(ValueError, match=r"noise must have shape \(B, \*\(1, 4, 4\)\)"):  # no shape=: the model's
        genie_fast.sample(gmm, noise=torch.randn(1, 1, 6, 6), nfe=3, solver="ddim")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        genie_fast.sample(gmm, n=1, nfe=3, solver="ddim")
        genie_fast.sample(gmm, n=1, shape=(1, 4, 4), nfe=3, solver="ddim")


@pytest.mark.parametrize("default", [torch.float32, torch.float64])
def test_model_files_load_under_either_default_dtype(stem, default):
    """Issue 29: under torch.set_default_dtype(torch.float64) the bundled model was refused ("dtype
    mismatch"): the file is read in its stored float32 (still checked, never cast on reading), then
    converted to the default dtype, or to dtype= when given."""
    from genie_fast.models.default import load_default

    want = load_model(stem)
    before = torch.get_default_dtype()
    torch.set_default_dtype(default)
    try:
        for m in (load_model(stem), load_default()):
            assert {p.dtype for p in m.parameters()} == {default}
        m = load_model(stem)
        for (k, a), b in zip(m.state_dict().items(), want.state_dict().values()):
            torch.testing.assert_close(a.float(), b, rtol=0, atol=0, msg=k)  # float32 -> float64 is exact
        m32 = load_model(stem, dtype=torch.float32)
        assert {p.dtype for p in m32.parameters()} == {torch.float32}
        with pytest.raises(ValueError, match="dtype must be torch.float32 or torch.float64"):
            load_model(stem, dtype=torch.float16)
    finally:
        torch.set_default_dtype(before)
    if default == torch.float64:  # a float64 accuracy run on it
        import genie_fast

        x, _ = genie_fast.sample(m, n=1, nfe=3, dtype=torch.float64)
        assert x.dtype == torch.float64 and bool(torch.isfinite(x).all())


# --------------------------------------------------------------------------- issue 29: a failing torchrun rank

_FAULTY_RANK = """
import os, sys
import genie_fast.sampling as sampling
from genie_fast.cli import main

if os.environ.get("FAULT_RANK") == os.environ["RANK"]:  # this rank raises on its second batch
    real, calls = sampling.sample, []
    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected fault in rank " + os.environ["RANK"])
        return real(*args, **kw)
    sampling.sample = failing
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("fault_rank", ["1", "0"])
def test_a_failing_rank_stops_every_rank_and_a_rerun_resumes(tmp_path, stem, fault_rank):
    """Issue 29: a rank of a torchrun job that raised mid-run left the others waiting at a barrier.
    Two gloo ranks (started as torchrun starts them, without torchrun's agent, which would kill the
    survivor itself), a fault injected into one: both exit non-zero within bounded time, the error
    is printed once (by its rank; the other says which rank failed), the batches written stay, and a
    rerun completes the folder without redoing them."""
    script = tmp_path / "rank.py"
    script.write_text(_FAULTY_RANK)
    out = tmp_path / "out"
    argv = ["generate", "--seeds", "0-11", "--outdir", str(out), "--model", str(stem), "--batch", "1",
            "--solver", "ddim", "--nfe", "2", "--grid", "logsnr", "--threads", "1", "--no-progress"]
    port = str(_free_port())
    procs = []
    for rank in ("0", "1"):
        env = {**os.environ, "RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "FAULT_RANK": fault_rank}
        procs.append(subprocess.Popen([sys.executable, str(script), *argv], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    t0 = time.time()
    try:
        results = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert time.time() - t0 < 90
    err = "".join(e for _, e in results)
    codes = [p.returncode for p in procs]
    assert all(c != 0 for c in codes), (codes, err[-3000:])
    assert err.count(f"injected fault in rank {fault_rank}") == 1, err[-3000:]
    other = 1 - int(fault_rank)
    assert f"rank {fault_rank} of 2 failed" in results[other][1], results[other][1][-2000:]
    done = {n: (out / "batches" / n).stat().st_mtime_ns for n in os.listdir(out / "batches")}
    assert 0 < len(done) < 12 and not (out / "samples.npz").exists()
    assert main(argv) == 0  # the rerun (one process) resumes
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["count"] == 12
    assert all((out / "batches" / n).stat().st_mtime_ns == t for n, t in done.items())


# --------------------------------------------------------------------------- issue 29: what a user installs

@pytest.fixture
def extras_blocked(monkeypatch):
    """Every optional dependency unimportable (as in an install of the core alone): a None entry in
    sys.modules makes `import name` raise ImportError."""
    for name in ("PIL", "PIL.Image", "matplotlib", "matplotlib.image", "diffusers", "triton"):
        monkeypatch.setitem(sys.modules, name, None)


def test_core_commands_run_without_any_extra(extras_blocked, tmp_path, data_root, stem, capsys):
    common = _common(data_root)
    assert main(["train", "--config", "tiny", "--out", str(tmp_path / "u"), "--steps", "1", *common]) == 0
    ckpt = tmp_path / "u" / "ckpt.pt"
    assert main(["distill", "--unet-ckpt", str(ckpt), "--out", str(tmp_path / "d"), "--steps", "1", *common]) == 0
    assert main(["export", "--unet-ckpt", str(ckpt), "--head-ckpt", str(tmp_path / "d" / "ckpt.pt"),
                 "--out", str(tmp_path / "exported")]) == 0
    assert main(["generate", "--seeds", "0-1", "--outdir", str(tmp_path / "g"), "--model", str(stem), "--batch", "2",
                 "--solver", "ddim", "--nfe", "2", "--threads", "1", "--no-progress"]) == 0
    assert (tmp_path / "g" / "samples.npz").exists()
    import genie_fast
    assert genie_fast.sample(load_model(stem), n=1, nfe=2)[0].shape == (1, 1, 8, 8)


@pytest.mark.parametrize("argv,extra", [
    (["sample", "--n", "1", "--nfe", "2"], "images"),
    (["generate", "--seeds", "0-1", "--batch", "2", "--format", "png"], "images"),
    (["encode", "--images", "x.png", "--nfe", "2"], "images"),
    (["encode", "--test-index", "0", "--nfe", "2", "--reconstruct", "r.png"], "images"),
    (["generate", "--seeds", "0-1", "--diffusers", "nowhere"], "diffusers"),
    (["distill", "--diffusers", "nowhere", "--steps", "1"], "diffusers"),
])
def test_commands_that_need_an_extra_name_it_before_any_work(extras_blocked, tmp_path, monkeypatch, capsys, stem,
                                                              argv, extra):
    """Issue 29: `genie-fast sample` needed matplotlib (only in the test extra) and `generate --format
    png` Pillow (declared nowhere): an ImportError after the work. Each names its extra first."""
    import genie_fast.models.default as default

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(default, "load_default", lambda *a, **k: pytest.fail("loaded a model first"))
    argv = [*argv, *(["--outdir", "out"] if argv[0] == "generate" else ["--out", "o"] if argv[0] == "distill" else
                     ["--out", "g.png"] if argv[0] == "sample" else ["--out", "z.safetensors"])]
    rc, err = _cli(capsys, *argv)
    assert rc == 2 and f"pip install 'genie_fast[{extra}]'" in err, err
    assert not list(tmp_path.rglob("*.png")) and not list(tmp_path.rglob("manifest.json"))


def test_pyproject_declares_each_extra_the_code_names():
    from pathlib import Path

    from genie_fast.checks import EXTRAS

    tomllib = pytest.importorskip("tomllib")  # (3.11+)
    extras = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]
    deps = extras["optional-dependencies"]
    for module, (package, extra) in EXTRAS.items():
        assert any(d.lower().startswith(package.lower()) for d in deps[extra]), (module, extra)
    assert "nvtx" in extras["dependencies"] and not any("matplotlib" in d or "Pillow" in d for d in extras["dependencies"])


# --------------------------------------------------------------------------- issue 29: threads

def test_sample_on_four_threads_equals_sequential_calls_bitwise():
    """Issue 29: calls of sample() from 4 threads (mixed solvers, seeds, labels and guidance scales,
    unconditional and class-conditional models sharing their cached engines and label wrappers)
    equal the same calls made one after another, bitwise (one intra-op thread per call, so each
    call's float order is its own). bench/bench_threads.py runs the bundled model the same way."""
    from concurrent.futures import ThreadPoolExecutor

    import genie_fast
    from _helpers import randomize
    from genie_fast.engine import SamplingEngine

    torch.manual_seed(0)
    plain = randomize(GenieModel(UNet("tiny")), 0.05).eval()
    cond = randomize(GenieModel(UNet("tiny_cond")), 0.05, seed=1).eval()
    solvers = ["ddim", "genie", "dpmpp_2m", "heun", "unipc", "genie_multistep"]
    calls = []
    for i in range(18):
        kw = dict(solver=solvers[i % len(solvers)], n=2, nfe=4, seed=i)
        if i % 3 == 2:
            kw.update(model=cond, labels=[i % 4, (i + 1) % 4], guidance_scale=1.0 + 0.5 * (i % 4))
        else:
            kw.update(model=plain)
        calls.append(kw)
    want = [genie_fast.sample(**kw)[0] for kw in calls]
    order = list(np.random.default_rng(0).permutation(len(calls)))
    with ThreadPoolExecutor(4) as pool:
        got = dict(zip(order, pool.map(lambda i: genie_fast.sample(**calls[i])[0], order)))
    for i, w in enumerate(want):
        assert torch.equal(got[i], w), (i, calls[i]["solver"], float((got[i] - w).abs().max()))
    # one SamplingEngine shared by the threads directly
    eng = SamplingEngine(plain, device="cpu")
    direct = [eng.sample(n=2, nfe=4, seed=i, solver=solvers[i % 6])[0] for i in range(12)]
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda i: eng.sample(n=2, nfe=4, seed=i, solver=solvers[i % 6])[0], range(12)))
    assert all(torch.equal(a, b) for a, b in zip(direct, threaded))


# --------------------------------------------------------------------------- issue 31: conditioning

class _EmbToy(torch.nn.Module):
    """eps(x, t, emb) of a toy conditional model: emb (B, 2) shifts eps; it declares its one input."""

    cond_names = ("emb",)
    image_shape = (1, 4, 4)

    def forward(self, x, t, emb):
        return 0.5 * x + emb[:, :1, None, None] - emb[:, 1:, None, None]


@pytest.mark.parametrize("kw,err,says", [
    (dict(cond=[1, 2]), TypeError, r"cond must be a mapping of input names to batch-first tensors"),
    (dict(cond={"emb": torch.zeros(3, 2)}), ValueError, r"cond\['emb'\] has 3 rows for 2 samples"),
    (dict(cond={"a-b": torch.zeros(2, 2)}), TypeError, r"cond: the names are the model's keyword arguments"),
    (dict(cond={"emb": torch.full((2, 2), float("nan"))}), ValueError, r"cond\['emb'\] holds 4 non-finite"),
    (dict(cond={"emb": 3.0}), TypeError, r"cond\['emb'\] must be a tensor"),
    (dict(cond={"emb": torch.tensor(1.0)}), ValueError, r"cond\['emb'\] must have a batch dimension"),
    (dict(cond={"emb": torch.zeros(2, 2)}, negative_cond=[0]), TypeError, r"negative_cond must be a mapping"),
    (dict(negative_cond={"emb": torch.zeros(2, 2)}), ValueError, r"negative_cond= needs cond="),
])
def test_cond_arguments_named_before_any_work(monkeypatch, kw, err, says):
    import genie_fast
    from genie_fast import sampling

    monkeypatch.setattr(sampling, "_default_model", lambda: pytest.fail("loaded the default model first"))
    with pytest.raises(err, match=says):
        genie_fast.sample(n=2, nfe=4, **kw)
    with pytest.raises(err, match=says):
        genie_fast.encode(None, torch.zeros(2, 1, 4, 4), nfe=4, **kw)
    with pytest.raises(err, match=says):  # and with a model, and through the engine
        genie_fast.sample(_EmbToy(), n=2, nfe=4, **kw)
    from genie_fast.engine import SamplingEngine
    with pytest.raises(err, match=says):
        SamplingEngine(_EmbToy(), device="cpu").sample(n=2, nfe=4, **kw)


def test_cond_against_the_model_named():
    import genie_fast

    m, e = _EmbToy(), torch.zeros(2, 2)
    for kw, err, says in (
            (dict(cond={"text": e}), ValueError, r"cond\['text'\]: _EmbToy takes no conditioning input 'text'; it takes "
                                                 r"\['emb'\]"),
            (dict(cond={"emb": e}, negative_cond={"other": e}), ValueError, r"negative_cond\['other'\]: _EmbToy takes"),
            (dict(cond={"emb": e}, negative_cond={"emb": torch.zeros(2, 3)}), ValueError,
             r"negative_cond\['emb'\] is \(2, 3\) torch.float32; the conditional input is \(2, 2\)"),
            (dict(cond={"emb": e}, guidance_scale=2.0), ValueError, r"guidance needs a negative branch: pass "
                                                                   r"negative_cond="),
            (dict(cond={"emb": e}, labels=1), ValueError, r"not class-conditional"),
            (dict(decode="vae"), TypeError, r"decode must be None, True or a callable"),
            (dict(decode=True), ValueError, r"decode=True needs a model with a decoder"),
            (dict(guidance_scale=2.0), ValueError, r"guidance_scale=2.0 needs labels or cond")):
        with pytest.raises(err, match=says):
            genie_fast.sample(m, n=2, nfe=4, solver="ddim", **kw)
    # one row for all samples is expanded; the names and rows given are what the model gets
    one, _ = genie_fast.sample(m, n=2, nfe=4, solver="ddim", cond={"emb": torch.tensor([[0.3, 0.1]])})
    two, _ = genie_fast.sample(m, n=2, nfe=4, solver="ddim", cond={"emb": torch.tensor([[0.3, 0.1]] * 2)})
    assert torch.equal(one, two)


def test_generate_cond_files_refused_by_name(tmp_path, capsys):
    """--cond / --negative-cond: one line, exit 2, before the model is loaded."""
    np.savez(tmp_path / "ok.npz", emb=np.zeros((2, 2), np.float32))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    np.savez(tmp_path / "objects.npz", emb=np.array([object(), 1], dtype=object))
    np.savez(tmp_path / "rows.npz", emb=np.zeros((3, 2), np.float32))
    base = ["generate", "--seeds", "0-1", "--outdir", str(tmp_path / "out"), "--nfe", "4", "--threads", "1",
            "--no-progress"]
    for extra, says in (((["--cond", str(tmp_path / "bad.npz")]), "--cond .*cannot be read as an .npz"),
                        ((["--cond", str(tmp_path / "objects.npz")]), "--cond .*cannot be read|--cond .*numeric"),
                        ((["--cond", str(tmp_path / "nothere.npz")]), "--cond .*not an .npz file"),
                        ((["--negative-cond", str(tmp_path / "ok.npz")]), "--negative-cond needs --cond"),
                        ((["--cond", str(tmp_path / "ok.npz"), "--labels", "1"]), "give --labels or --cond"),
                        ((["--cond", str(tmp_path / "rows.npz")]), r"--cond\['emb'\] has 3 rows for 2 samples")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and re.search(says, err[0]), (extra, err)


def test_cond_wrappers_on_four_threads_equal_sequential_calls_bitwise():
    """The guidance buffers hold one call's inputs per thread: threads sampling one model with
    different cond / negative_cond / scales get what sequential calls get."""
    from concurrent.futures import ThreadPoolExecutor

    import genie_fast

    m = _EmbToy()
    g = torch.Generator().manual_seed(0)
    calls = [dict(cond={"emb": torch.randn(2, 2, generator=g)}, negative_cond={"emb": torch.randn(2, 2, generator=g)},
                  guidance_scale=1.5 + i % 3, seed=i, solver=("ddim", "dpmpp_2m", "heun")[i % 3]) for i in range(12)]
    want = [genie_fast.sample(m, n=2, nfe=6, **kw)[0] for kw in calls]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda kw: genie_fast.sample(m, n=2, nfe=6, **kw)[0], calls))
    assert all(torch.equal(a, b) for a, b in zip(want, got))
