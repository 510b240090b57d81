"""``genie-fast generate``: seeds, batches, atomic files, resume, refusal of a different run, and
the same images alone and under torchrun (gloo, 2 processes), after a kill -9 midway."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from genie_fast.cli import main
from genie_fast.generate import format_seeds, generate, parse_seeds, seed_noise, to_uint8, weights_hash
from genie_fast.models import load_default
from genie_fast.sampling import make_noise

# the bundled model, a cheap setting: 3 DDIM steps
ARGS = ["--solver", "ddim", "--nfe", "3", "--grid", "logsnr", "--threads", "1", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    return load_default().eval()


def _run(model, seeds, outdir, **kw):
    kw = {"solver": "ddim", "nfe": 3, "grid": "logsnr", "progress": False, **kw}
    return generate(model, seeds, outdir, model_info={"kind": "test"}, **kw)


def _samples(outdir):
    with np.load(outdir / "samples.npz") as f:
        return {k: f[k] for k in f}


def test_seed_specs():
    assert parse_seeds("0-3,10,7-8") == [0, 1, 2, 3, 10, 7, 8]
    assert format_seeds([10, 0, 1, 2, 3, 7, 8]) == "0-3,7-8,10"
    for bad in ("", "a-b", "5-2", "1,1", "-3", "1-2-3"):
        with pytest.raises(ValueError):
            parse_seeds(bad)
    # a seed's noise is its own generator's, whatever the batch around it
    torch.testing.assert_close(seed_noise([7, 3], (1, 4, 4))[1], make_noise(1, (1, 4, 4), 3)[0], rtol=0, atol=0)
    from genie_fast.engine import seed_noise as the_one_definition
    assert seed_noise is the_one_definition  # generate and sample(seeds=) draw a seed's noise the same way


def test_batches_resume_and_the_samples_file(model, tmp_path):
    a = tmp_path / "a"
    m = _run(model, parse_seeds("0-6"), a, batch=3)
    assert sorted(os.listdir(a / "batches")) == ["0_3.npz", "3_3.npz", "6_1.npz"]
    assert m["status"] == "complete" and m["count"] == 7 and m["seeds"] == "0-6" and m["nfe_per_sample"] == 3
    assert m["identity"]["model_sha256"] == weights_hash(model) and m["versions"]["torch"] == torch.__version__
    s = _samples(a)
    assert s["arr_0"].shape == (7, 32, 32, 3) and s["arr_0"].dtype == np.uint8
    assert (s["seeds"] == np.arange(7)).all() and "arr_1" not in s
    # the image of seed 4 is sample() of its noise, in batch [3, 4, 5]
    import genie_fast
    x0, _ = genie_fast.sample(model, noise=seed_noise([3, 4, 5], (1, 32, 32)), solver="ddim", nfe=3, grid="logsnr")
    assert (s["arr_0"][4] == np.repeat(to_uint8(x0)[1], 3, axis=-1)).all()

    # a rerun with more seeds computes only the new ones; the old files stay untouched
    mtime = (a / "batches" / "0_3.npz").stat().st_mtime_ns
    m = _run(model, parse_seeds("0-9"), a, batch=3)
    assert m["count"] == 10 and (a / "batches" / "0_3.npz").stat().st_mtime_ns == mtime
    assert "7_3.npz" in os.listdir(a / "batches")

    # another batch size: within one 8-bit level
    b = tmp_path / "b"
    _run(model, parse_seeds("0-9"), b, batch=4)
    diff = np.abs(_samples(b)["arr_0"].astype(int) - _samples(a)["arr_0"].astype(int))
    assert diff.max() <= 1


def test_a_different_run_into_the_folder_is_refused(model, tmp_path):
    out = tmp_path / "o"
    _run(model, [0, 1], out, batch=2)
    for change in ({"nfe": 4}, {"solver": "dpmpp_2m"}, {"grid": "quadratic"}, {"denoise": True}):
        with pytest.raises(ValueError, match="refusing to mix") as e:
            _run(model, [0, 1, 2], out, batch=2, **change)
        assert next(iter(change)) in str(e.value)
    other = load_default().eval()
    with torch.no_grad():
        other.head.conv_out.bias.add_(1.0)
    with pytest.raises(ValueError, match="model_sha256"):
        _run(other, [0, 1], out, batch=2)
    assert main(["generate", "--seeds", "0-2", "--outdir", str(out), "--solver", "ddim", "--nfe", "5",
                 "--no-progress"]) == 2
    assert sorted(os.listdir(out / "batches")) == ["0_2.npz"]


def test_png_format_and_labels_refused_for_an_unconditional_model(model, tmp_path):
    out = tmp_path / "p"
    _run(model, [5, 2, 9], out, batch=2, fmt="png")
    assert sorted(os.listdir(out / "images")) == ["2.png", "5.png", "9.png"]
    s = _samples(out)
    assert s["seeds"].tolist() == [2, 5, 9] and s["arr_0"].shape == (3, 32, 32, 3)
    from PIL import Image
    with Image.open(out / "images" / "5.png") as im:
        assert (np.asarray(im) == s["arr_0"][1, :, :, 0]).all()
    from genie_fast.models.gmm import GaussianMixture
    unconditional = GaussianMixture.random(3, (1, 4, 4), seed=0)  # the bundled model now has classes
    with pytest.raises(ValueError, match="not class-conditional"):
        _run(unconditional, [0], tmp_path / "l", labels=3)
    with pytest.raises(ValueError, match="needs --labels"):
        _run(model, [0], tmp_path / "g", guidance_scale=2.0)


def test_class_labels_and_guidance(tmp_path):
    from genie_fast.models.gmm import GaussianMixture
    gmm = GaussianMixture.random(6, (1, 4, 4), seed=0, classes=[0, 0, 1, 1, 2, 2])
    m = _run(gmm, range(6), tmp_path / "c", batch=4, labels="cycle", guidance_scale=2.0, solver="dpmpp_2m", nfe=8)
    s = _samples(tmp_path / "c")
    assert s["arr_1"].tolist() == [0, 1, 2, 0, 1, 2] and m["identity"]["labels"] == "cycle"
    assert m["nfe_per_sample"] == 8  # a guided call costs two evaluations per sample
    m = _run(gmm, range(2), tmp_path / "one", batch=4, labels=1, solver="dpmpp_2m", nfe=8)
    assert _samples(tmp_path / "one")["arr_1"].tolist() == [1, 1]
    assert m["identity"]["guidance_scale"] == 2.0  # labels alone: genie_fast's default guidance scale
    with pytest.raises(ValueError, match="labels must be in"):
        _run(gmm, range(2), tmp_path / "bad", labels=7)


def _wait_for(predicate, timeout):
    t0 = time.time()
    while not predicate():
        if time.time() - t0 > timeout:
            raise TimeoutError
        time.sleep(0.01)


def test_torchrun_after_a_kill_matches_a_single_process_run(model, tmp_path):
    seeds = "0-27"
    ref = tmp_path / "single"
    _run(model, parse_seeds(seeds), ref, batch=2)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "genie_fast.cli", "generate", "--seeds", seeds, "--outdir", str(out),
           "--batch", "2", *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(lambda: (out / "batches").is_dir() and len(os.listdir(out / "batches")) >= 2 or
                  proc.poll() is not None, timeout=120)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = [n for n in os.listdir(out / "batches") if n.endswith(".npz")]
    assert 0 < len(done) < 14 and not (out / "samples.npz").exists()
    assert json.loads((out / "manifest.json").read_text())["status"] == "running"

    # resume under torchrun with 2 processes (gloo): only the missing seeds are computed
    before = {n: (out / "batches" / n).stat().st_mtime_ns for n in done}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "genie_fast.cli", "generate", "--seeds", seeds, "--outdir", str(out), "--batch", "2",
                          *ARGS], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert all((out / "batches" / n).stat().st_mtime_ns == t for n, t in before.items())
    m = json.loads((out / "manifest.json").read_text())
    assert m["status"] == "complete" and m["count"] == 28 and m["last_world_size"] == 2
    assert not [n for n in os.listdir(out) + os.listdir(out / "batches") if ".tmp-" in n]
    a, b = _samples(ref), _samples(out)
    assert (a["seeds"] == b["seeds"]).all()
    assert (a["arr_0"] == b["arr_0"]).all()  # bitwise, whatever the world size


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_torchrun_nccl_two_gpus(tmp_path):  # pragma: no cover - needs GPUs
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for out, n in ((tmp_path / "one", "1"), (tmp_path / "two", "2")):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", n,
                            "-m", "genie_fast.cli", "generate", "--seeds", "0-15", "--outdir", str(out), "--batch", "4",
                            "--device", "cuda", "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    assert (_samples(tmp_path / "one")["arr_0"] == _samples(tmp_path / "two")["arr_0"]).all()
