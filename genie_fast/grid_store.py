"""Tuned time grids stored beside a model: ``<stem>.grids.json`` (a diffusers folder:
``<folder>/genie_fast.grids.json``), written by `genie_fast.tune_grid` through `save_tuned_grid` or by
``genie-fast tune-grid``, read by the engine for ``grid="tuned"`` and preferred by ``grid="auto"``.

The file::

    {"format": "genie_fast.grids", "version": 2,
     "weights": "<sha256 of the network and head weights, float32: the model last written for>",
     "grids": [{"solver": "genie_multistep", "steps": 5, "nfe": 5, "afs": true, "denoise": false,
                "guidance_scale": null, "times": [1.0, ..., 0.001], "weights": "<sha256>",
                "tuned": {"method": "search", "n": 64, "seed": 0, "labels": "none", "seconds": 412.0, ...},
                "error": {"tuned": 0.051, "fixed": {"uniform": 0.09, ...}}}, ...]}

A grid is found by its key: (solver, steps, afs, denoise, guidance_scale). guidance_scale is null for
a run without labels (an unconditional model, or a class-conditional one's null class) and the scale
s of a run with labels (1: the conditional model alone); a guided grid is tuned with labels drawn
uniformly and serves every label. The budget a key spends follows from it (`solvers.nfe_of`) and is
stored for reading. Grids serve only the weights they were tuned for: each record carries the hash of
what its solver reads, the network and head for a solver of `solvers.HEAD_SOLVERS`, the network alone
for the others (so a new head keeps the head-free solvers' grids); a record whose hash differs from
the model's is refused for ``grid="tuned"`` and ignored, with a warning, by ``grid="auto"``. Version 1
files (one top-level hash for every record) are read as if each record carried that hash.

A model's file is read once per model object (the first run that asks) and then kept with it;
`save_tuned_grid` updates the file and that model's copy, so a grid tuned in this process is used at
once; a file changed by another process is seen by models loaded after the change.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import torch

from .files import weights_hash

__all__ = ["FORMAT", "VERSION", "GridFileError", "GridTable", "grids_path", "model_weights_id", "load_table",
           "table_of", "grid_context", "stored_times", "tuned_for", "save_tuned_grid"]

FORMAT, VERSION, _READS = "genie_fast.grids", 2, (1, 2)
_KEY_FIELDS = ("solver", "steps", "afs", "denoise", "guidance_scale")


class GridFileError(ValueError):
    """A grids file that cannot be used: not JSON, another format, or a record with bad values."""


def grids_path(model) -> Path | None:
    """Where `model`'s tuned grids live: its ``grids_path`` attribute (set by `models.load_model` and
    `models.load_diffusers`), else None (a model built in memory has no place for them)."""
    p = getattr(model, "grids_path", None)
    return None if p is None else Path(p)


def model_weights_id(model) -> str:
    """sha256 of the model's weights as float32 on the CPU (network and head), whatever dtype or device
    the model is in now: a float64 copy of the bundled model is the same model."""
    state = model.state_dict()
    # float32 of a float64 copy of float32 weights is exact; other tensors (int buffers) stay as they are
    mod = torch.nn.Module()
    for i, (name, t) in enumerate(sorted(state.items())):
        t = t.detach().cpu()
        mod.register_buffer(f"b{i}", t.float() if t.is_floating_point() else t)
    return weights_hash(mod)


def _ids(model) -> tuple[str, str]:
    """(network and head id, network-only id) of `model`, computed once per model object. The network
    alone: every tensor of its state but the head's (names under ``head.``)."""
    ids = model.__dict__.get("_genie_weights_ids")
    if ids is None:
        net = _NoHead(model)
        ids = model.__dict__["_genie_weights_ids"] = (model_weights_id(model), model_weights_id(net))
    return ids


class _NoHead:
    """`model` seen without its head's tensors (for `model_weights_id`)."""

    def __init__(self, model):
        self._model = model

    def state_dict(self):
        return {k: v for k, v in self._model.state_dict().items() if not k.startswith("head.")}


def _needed_id(model, solver: str) -> str:
    """The id a grid of `solver` must have been tuned for on `model`."""
    from .solvers import HEAD_SOLVERS

    full, net = _ids(model)
    return full if solver in HEAD_SOLVERS else net


def _key(solver, steps, afs, denoise, scale) -> tuple:
    return (str(solver), int(steps), bool(afs), bool(denoise), None if scale is None else float(scale))


def _check_record(path, i, rec) -> dict:
    where = f"{path}: grids[{i}]"
    if not isinstance(rec, dict):
        raise GridFileError(f"{where} must be a JSON object")
    missing = [k for k in (*_KEY_FIELDS, "times") if k not in rec]
    if missing:
        raise GridFileError(f"{where} lacks {', '.join(missing)}")
    if not isinstance(rec["steps"], int) or isinstance(rec["steps"], bool) or rec["steps"] < 1:
        raise GridFileError(f"{where}.steps must be a positive integer, got {rec['steps']!r}")
    for k in ("afs", "denoise"):
        if not isinstance(rec[k], bool):
            raise GridFileError(f"{where}.{k} must be true or false, got {rec[k]!r}")
    s = rec["guidance_scale"]
    if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s)):
        raise GridFileError(f"{where}.guidance_scale must be null or a finite number, got {s!r}")
    times = rec["times"]
    if (not isinstance(times, list) or len(times) != rec["steps"] + 1
            or not all(isinstance(t, (int, float)) and not isinstance(t, bool) and 0 < t <= 1 for t in times)
            or any(a <= b for a, b in zip(times, times[1:]))):
        raise GridFileError(f"{where}.times must be {rec['steps'] + 1} strictly decreasing times in (0, 1]")
    return rec


class GridTable:
    """The tuned grids of one file, by key. ``weights``: the hash they were tuned for."""

    def __init__(self, path: Path, weights: str | None, records: list[dict]):
        self.path, self.weights = Path(path), weights
        self.records = {_key(*(r[k] for k in _KEY_FIELDS)): r for r in records}

    def keys(self) -> list[tuple]:
        return sorted(self.records, key=lambda k: (k[0], k[1], k[2], k[3], -1.0 if k[4] is None else k[4]))

    def describe(self) -> str:
        def one(k):
            s = "no labels" if k[4] is None else f"guidance {k[4]:g}"
            return f"{k[0]} {k[1]} steps (afs={k[2]}, denoise={k[3]}, {s})"
        return "; ".join(one(k) for k in self.keys()) or "none"

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "weights": self.weights,
                "grids": [self.records[k] for k in self.keys()]}


def load_table(path) -> GridTable:
    """Read and check a grids file (an absent file: an empty table)."""
    path = Path(path)
    if not path.exists():
        return GridTable(path, None, [])
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GridFileError(f"{path}: not a readable JSON grids file ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") not in _READS:
        raise GridFileError(f"{path}: expected format {FORMAT!r} version {' or '.join(map(str, _READS))}")
    if not isinstance(data.get("grids"), list) or not isinstance(data.get("weights"), (str, type(None))):
        raise GridFileError(f"{path}: expected 'weights' (a string) and 'grids' (a list)")
    records = [_check_record(path, i, r) for i, r in enumerate(data["grids"])]
    for i, rec in enumerate(records):
        if data["version"] == 1:
            rec.setdefault("weights", data["weights"])
        if not isinstance(rec.get("weights"), str):
            raise GridFileError(f"{path}: grids[{i}].weights must be the hash of the weights it was tuned for")
    return GridTable(path, data["weights"], records)


def table_of(model) -> GridTable | None:
    """`model`'s tuned grids (read once per model object), or None when it has no grids file."""
    cached = getattr(model, "__dict__", {}).get("_genie_grid_table")  # False: looked, no file (no stat on every run)
    if cached is not None:
        return cached or None
    path = grids_path(model)
    table = load_table(path) if path is not None and path.exists() else None
    if hasattr(model, "__dict__"):
        model.__dict__["_genie_grid_table"] = table if table is not None else False
    return table


def grid_context(model):
    """(table, guidance scale, inner model) of a run of `model` (the engine's model: an eps model, or a
    `guidance.Conditioned` wrapper, whose labels make the scale a number), or None without a table."""
    scale = getattr(model, "guidance_value", None)
    inner = model.model if scale is not None else model
    table = table_of(inner)
    return None if table is None else (table, scale, inner)


def _valid(rec: dict, inner) -> bool:
    """Whether a stored grid was tuned for what its solver reads of `inner` (ids computed once per model);
    a head-free solver's grid recorded under the whole model's id (a version-1 file) is valid too."""
    return rec["weights"] in (_needed_id(inner, rec["solver"]), _ids(inner)[0])


def _stale(table: GridTable, rec: dict, inner, tuned_required: bool) -> None:
    """Refuse (grid="tuned") or warn once per model (grid="auto") about a grid made for other weights."""
    ident = _needed_id(inner, rec["solver"])
    what = "network and head" if ident == _ids(inner)[0] else "network"
    msg = (f"the tuned {rec['solver']} grid in {table.path} was made for other weights ({rec['weights'][:12]}..., "
           f"this model's {what} are {ident[:12]}...): re-tune it (genie-fast tune-grid)")
    if tuned_required:
        raise GridFileError(msg)
    if not inner.__dict__.get("_genie_grid_warned"):
        inner.__dict__["_genie_grid_warned"] = True
        warnings.warn(msg + "; grid='auto' uses the fixed grids", stacklevel=4)


def stored_times(context, solver, steps, afs, denoise, *, required: bool, nfe=None) -> torch.Tensor | None:
    """The stored times (float64, with attribute ``afs``) for this run's key, or None (required=False:
    grid="auto") / a GridFileError naming what is stored (required=True: grid="tuned")."""
    if context is None:
        if required:
            raise GridFileError("grid='tuned' needs a model with tuned grids (<stem>.grids.json beside a model "
                                "loaded from files; make them with genie-fast tune-grid or genie_fast.tune_grid)")
        return None
    table, scale, inner = context
    rec = table.records.get(_key(solver, steps, afs, denoise, scale))
    if rec is None:
        if required:
            s = "no labels" if scale is None else f"guidance {scale:g}"
            budget = "" if nfe is None else f" ({nfe} NFE)"
            raise GridFileError(f"no tuned grid in {table.path} for {solver} at {steps} steps{budget} with "
                                f"afs={afs}, denoise={denoise}, {s}; stored: {table.describe()}")
        return None
    if not _valid(rec, inner):
        _stale(table, rec, inner, required)
        return None
    times = torch.tensor(rec["times"], dtype=torch.float64)
    times.afs = bool(rec["afs"])
    return times


def tuned_for(model, solver, nfe, steps, grid, afs, denoise, guidance_scale) -> torch.Tensor | None:
    """The stored grid a sampling run of these options would use (`sample`'s arguments; guidance_scale:
    the run's scale when it has labels, else None), or None: for jobs that record their grid up front."""
    from .solvers import DEFAULT_SOLVER, resolve

    if not (grid is None or isinstance(grid, str) and grid in ("auto", "tuned")):
        return None
    solver = DEFAULT_SOLVER if solver is None else solver
    evals = 1 if guidance_scale is None or float(guidance_scale) == 1.0 else 2
    opts = resolve(solver, nfe, steps, "auto", afs, denoise, evals_per_call=evals)
    table = table_of(model)
    context = None if table is None else (table, None if guidance_scale is None else float(guidance_scale), model)
    return stored_times(context, solver, opts.steps, opts.afs, opts.denoise, required=grid == "tuned", nfe=opts.spent)


def save_tuned_grid(model, grid: torch.Tensor, solver: str, *, guidance_scale=None, denoise: bool = False,
                    path=None, info: dict | None = None) -> Path:
    """Store `grid` (from `tune_grid`, carrying ``afs``) for `solver` in `model`'s grids file (or `path`),
    replacing a grid of the same key. A file made for other weights is refused: tune every grid of a
    file for one model (delete the file to start again). Written atomically. Returns the path."""
    from .solvers import nfe_of

    path = Path(path) if path is not None else grids_path(model)
    if path is None:
        raise ValueError("the model has no grids file (it was not loaded from files): give path=")
    afs = getattr(grid, "afs", None)
    if not isinstance(afs, bool):
        raise ValueError("grid must come from tune_grid (a tensor with a boolean .afs attribute)")
    times = [float(t) for t in grid.detach().double().cpu()]
    model.__dict__.pop("_genie_weights_ids", None)  # weights may have changed since the last run
    table = load_table(path)
    stale = [r["solver"] for r in table.records.values() if not _valid(r, model)]
    if stale:
        raise GridFileError(f"{path} holds grids tuned for other weights ({', '.join(sorted(set(stale)))}); this "
                            f"model's are {_ids(model)[0][:12]}...: remove the file (or those grids) to tune for "
                            f"this model")
    steps = len(times) - 1
    evals = 1 if guidance_scale is None or float(guidance_scale) == 1.0 else 2
    rec = {"solver": solver, "steps": steps, "nfe": nfe_of(solver, steps, afs, denoise, evals), "afs": afs,
           "denoise": bool(denoise), "guidance_scale": None if guidance_scale is None else float(guidance_scale),
           "times": times}
    rec.update(info or {})
    rec["weights"] = _needed_id(model, solver)
    table = GridTable(path, _ids(model)[0], [*table.records.values(), _check_record(path, 0, rec)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(table.to_json(), indent=1) + "\n")
    os.replace(tmp, path)
    if grids_path(model) == path:
        model.__dict__["_genie_grid_table"] = table
    return path
