"""Tuned grids stored beside a model (`genie_fast.grid_store`): grid="tuned" and grid="auto" find them
by (solver, steps, afs, denoise, guidance scale), only for the weights they were tuned for, through
sample, encode, the engine, generate and the command line."""
import json
import warnings

import pytest
import torch

import genie_fast
from _helpers import tiny_cond_model
from genie_fast import cli
from genie_fast.generate import generate
from genie_fast.grid_store import GridFileError, load_table, model_weights_id, save_tuned_grid
from genie_fast.models import load_model, save_model
from genie_fast.schedule import time_grid
from genie_fast.solvers import AUTO_GRID, resolve

@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny class-conditional model on disk and one tuned grid stored beside it (genie_multistep, NFE 4)."""
    model = tiny_cond_model()
    stem = save_model(model, tmp_path_factory.mktemp("grids") / "m")
    model = load_model(stem)
    grid = genie_fast.tune_grid(model, solver="genie_multistep", nfe=4, n=4, fine=4, method="dp", progress=False)
    path = save_tuned_grid(model, grid, "genie_multistep", info=grid.info)
    return stem, grid, path


def _noise(n=3, seed=1):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_a_stored_grid_is_what_tuned_and_auto_run(saved):
    stem, grid, path = saved
    assert path == stem.parent / "m.grids.json"
    model = load_model(stem)  # a fresh load reads the file
    z = _noise()
    tuned, nfe = genie_fast.sample(model, noise=z, nfe=4, grid="tuned")
    auto, _ = genie_fast.sample(model, noise=z, nfe=4)
    explicit, _ = genie_fast.sample(model, noise=z, nfe=4, grid=grid.clone(), afs=grid.afs)
    assert nfe == 4 and torch.equal(tuned, explicit) and torch.equal(auto, explicit)
    rec = json.loads(path.read_text())["grids"][0]
    assert rec["solver"] == "genie_multistep" and rec["nfe"] == 4 and rec["steps"] == len(grid) - 1
    assert rec["tuned"]["method"] == "dp" and rec["error"]["tuned"] <= min(rec["error"][g] for g in AUTO_GRID.values())


def test_other_keys_fall_back_to_the_fixed_grid_or_are_refused(saved):
    stem, grid, _ = saved
    model = load_model(stem)
    z = _noise()
    fixed = AUTO_GRID["genie_multistep"]
    for kw in ({"nfe": 5}, {"nfe": 4, "afs": False}, {"nfe": 4, "solver": "unipc"}, {"nfe": 4, "labels": 1}):
        solver = kw.pop("solver", "genie_multistep")
        auto, _ = genie_fast.sample(model, noise=z, solver=solver, grid="auto", **kw)
        named, _ = genie_fast.sample(model, noise=z, solver=solver, grid=AUTO_GRID[solver], **kw)
        assert torch.equal(auto, named), (solver, kw)
        with pytest.raises(GridFileError, match=r"no tuned grid in .*m\.grids\.json for .* stored: genie_multistep "):
            genie_fast.sample(model, noise=z, solver=solver, grid="tuned", **kw)
    assert fixed in ("uniform", "quadratic", "logsnr", "edm")


def test_a_guided_grid_serves_its_scale_only(saved, tmp_path):
    stem, grid, _ = saved
    model = load_model(stem)
    labels = torch.tensor([0, 1, 2, 0])
    g = genie_fast.tune_grid(model, solver="ddim", nfe=6, n=4, fine=4, labels=labels, guidance_scale=2.0,
                             method="dp", progress=False)
    path = save_tuned_grid(model, g, "ddim", guidance_scale=2.0, path=tmp_path / "g.grids.json")
    model.grids_path = path
    model.__dict__.pop("_genie_grid_table", None)
    z = _noise(4)
    a, nfe = genie_fast.sample(model, noise=z, solver="ddim", nfe=6, grid="tuned", labels=labels, guidance_scale=2.0)
    b, _ = genie_fast.sample(model, noise=z, solver="ddim", nfe=6, grid=g.clone(), afs=g.afs, labels=labels,
                             guidance_scale=2.0)
    assert nfe == 6 and torch.equal(a, b)
    # the default scale with labels is 2: the same key
    c, _ = genie_fast.sample(model, noise=z, solver="ddim", nfe=6, grid="tuned", labels=labels)
    assert torch.equal(a, c)
    for kw in ({"labels": labels, "guidance_scale": 3.0}, {}):
        with pytest.raises(GridFileError, match="no tuned grid"):
            genie_fast.sample(model, noise=z, solver="ddim", nfe=6, grid="tuned", **kw)


def test_encode_and_the_engine_take_the_stored_grid(saved):
    stem, _, _ = saved
    model = load_model(stem)
    g = genie_fast.tune_grid(model, solver="ddim", steps=3, n=4, fine=4, afs=False, method="dp", progress=False)
    save_tuned_grid(model, g, "ddim")  # updates this model's table too
    x0 = _noise(2, 5)
    z, nfe = genie_fast.encode(model, x0, solver="ddim", steps=3, grid="tuned")
    ref, _ = genie_fast.encode(model, x0, solver="ddim", steps=3, grid=g.clone())
    assert nfe == 3 and torch.equal(z, ref)
    engine = genie_fast.SamplingEngine(model)
    a, _ = engine.sample(noise=z, solver="ddim", steps=3, grid="tuned", afs=False)
    b, _ = engine.sample(noise=z, solver="ddim", steps=3, grid=g.clone(), afs=False)
    assert torch.equal(a, b)


def test_grids_for_other_weights_are_refused_by_tuned_and_ignored_by_auto(saved, tmp_path):
    stem, grid, path = saved
    model = load_model(stem)
    with torch.no_grad():
        next(model.unet.parameters()).add_(1e-3)
    other = save_model(model, tmp_path / "other")
    (tmp_path / "other.grids.json").write_text(path.read_text())
    model = load_model(other)
    z = _noise()
    with pytest.raises(GridFileError, match="made for other weights"):
        genie_fast.sample(model, noise=z, nfe=4, grid="tuned")
    with pytest.warns(UserWarning, match="other weights.*fixed grids"):
        auto, _ = genie_fast.sample(model, noise=z, nfe=4)
    named, _ = genie_fast.sample(model, noise=z, nfe=4, grid=AUTO_GRID["genie_multistep"])
    assert torch.equal(auto, named)
    with pytest.raises(GridFileError, match="tuned for other weights"):
        save_tuned_grid(model, grid, "genie_multistep")


def test_a_new_head_keeps_the_head_free_solvers_grids(saved, tmp_path):
    """A grid records what its solver reads: unipc's survives a new head, genie_multistep's does not; a
    version-1 file (one hash for every record) still reads, each record under that hash."""
    stem, _, path = saved
    model = load_model(save_model(load_model(stem), tmp_path / "h"))
    (tmp_path / "h.grids.json").write_text(path.read_text())
    g = time_grid(model.schedule, 4, "logsnr")
    g.afs = True
    save_tuned_grid(model, g, "unipc")
    recs = {r["solver"]: r["weights"] for r in json.loads((tmp_path / "h.grids.json").read_text())["grids"]}
    assert recs["genie_multistep"] == model_weights_id(model) != recs["unipc"]
    with torch.no_grad():
        next(model.head.parameters()).add_(1e-3)
    model = load_model(save_model(model, tmp_path / "h"))  # same network, new head, same grids file
    z = _noise()
    a, _ = genie_fast.sample(model, noise=z, solver="unipc", nfe=3, grid="tuned")
    b, _ = genie_fast.sample(model, noise=z, solver="unipc", nfe=3, grid=g.clone(), afs=True)
    assert torch.equal(a, b)
    with pytest.raises(GridFileError, match="genie_multistep grid .* made for other weights.*network and head"):
        genie_fast.sample(model, noise=z, nfe=4, grid="tuned")
    v1 = json.loads(path.read_text())
    v1["version"] = 1
    for r in v1["grids"]:
        r.pop("weights")
    (tmp_path / "v1.grids.json").write_text(json.dumps(v1))
    assert all(r["weights"] == v1["weights"] for r in load_table(tmp_path / "v1.grids.json").records.values())


def test_the_weights_hash_ignores_dtype_and_a_model_without_files_has_no_grids(saved):
    stem, grid, _ = saved
    model = load_model(stem)
    assert model_weights_id(model) == model_weights_id(load_model(stem, dtype=torch.float64))
    model.grids_path = None
    model.__dict__.pop("_genie_grid_table", None)
    with pytest.raises(GridFileError, match="needs a model with tuned grids"):
        genie_fast.sample(model, noise=_noise(), nfe=4, grid="tuned")
    with pytest.raises(ValueError, match="no grids file"):
        save_tuned_grid(model, grid, "genie_multistep")
    with pytest.raises(ValueError, match="from tune_grid"):
        save_tuned_grid(model, grid.clone(), "genie_multistep", path=stem.parent / "x.grids.json")
    with pytest.raises(ValueError, match="grid='tuned' is a model's stored grid"):
        resolve("ddim", grid="tuned")


@pytest.mark.parametrize("text,match", [
    ("{", "not a readable JSON"),
    ('{"format": "other", "version": 1}', "expected format"),
    ('{"format": "genie_fast.grids", "version": 1, "weights": "x", "grids": [{"solver": "ddim"}]}', "lacks steps"),
    ('{"format": "genie_fast.grids", "version": 1, "weights": "x", "grids": [{"solver": "ddim", "steps": 2, '
     '"afs": true, "denoise": false, "guidance_scale": null, "times": [1.0, 0.5, 0.7]}]}', "strictly decreasing"),
    ('{"format": "genie_fast.grids", "version": 1, "weights": "x", "grids": [{"solver": "ddim", "steps": 1, '
     '"afs": 1, "denoise": false, "guidance_scale": null, "times": [1.0, 0.5]}]}', "afs must be true or false"),
])
def test_a_bad_grids_file_is_named(tmp_path, text, match):
    p = tmp_path / "m.grids.json"
    p.write_text(text)
    with pytest.raises(GridFileError, match=match) as e:
        load_table(p)
    assert str(p) in str(e.value)


def test_generate_records_the_tuned_times(saved, tmp_path):
    stem, grid, _ = saved
    model = load_model(stem)
    generate(model, seeds=[0, 1], outdir=tmp_path / "out", batch=2, nfe=4, fmt="npz")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["identity"]["grid"] == [float(t) for t in grid] and manifest["identity"]["afs"] is True


def test_the_command_line_tunes_stores_and_samples(saved, tmp_path, capsys):
    stem, _, _ = saved
    model = load_model(stem)
    other = save_model(model, tmp_path / "cli")
    assert cli.main(["tune-grid", "--model", str(other), "--solver", "ddim", "--nfe", "3", "--n", "4", "--fine", "4",
                     "--method", "dp"]) == 0
    assert "ddim, 4 steps (afs=True), no labels" in capsys.readouterr().out  # AFS + 3 NFE
    assert [k[:3] for k in load_table(tmp_path / "cli.grids.json").keys()] == [("ddim", 4, True)]
    pytest.importorskip("PIL")
    assert cli.main(["sample", "--model", str(other), "--solver", "ddim", "--nfe", "3", "--grid", "tuned", "--n", "2",
                     "--out", str(tmp_path / "s.png")]) == 0
    assert cli.main(["sample", "--model", str(other), "--solver", "ddim", "--nfe", "5", "--grid", "tuned", "--n", "2",
                     "--out", str(tmp_path / "s.png")]) == 2
    assert "no tuned grid" in capsys.readouterr().err
    assert cli.main(["tune-grid", "--guidance-scale", "2", "--nfe", "3"]) == 2
    assert "--guidance-scale needs --labels" in capsys.readouterr().err


def test_the_bundled_model_ships_grids_tuned_for_its_weights():
    """Its grids file loads, was made for the bundled weights (else grid="auto" would warn and ignore it),
    and sample()'s default grid at NFE 5 is the stored one."""
    from genie_fast.grid_store import table_of
    from genie_fast.models import load_default

    model = load_default()
    table = table_of(model)
    assert table is not None and table.weights == model_weights_id(model)
    keys = table.keys()
    assert ("genie_multistep", 6, True, False, None) in keys  # NFE 5, null class: AFS + 5 steps
    z = _noise(2).repeat(1, 1, 4, 4)  # the bundled model is 1x32x32
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "other weights" warning
        a, nfe = genie_fast.sample(model, noise=z, nfe=5)
    times = torch.tensor(table.records[("genie_multistep", 6, True, False, None)]["times"], dtype=torch.float64)
    b, _ = genie_fast.sample(model, noise=z, nfe=5, grid=times, afs=True)
    assert nfe == 5 and torch.equal(a, b)
