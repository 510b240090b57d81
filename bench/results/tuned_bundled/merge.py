"""Merge the grids files the tuning runs wrote (null class, guided) into the bundled model's
genie_fast/assets/fmnist_genie.grids.json (every grid checked: tuned for the bundled weights; each
record then carries the hash of what its solver reads, network and head or the network alone). A grid
whose held-out median error is above the best fixed grid's at its budget is left out: grid="auto"
would otherwise run something worse than the fixed grid it replaces.

    PYTHONPATH=. python bench/results/tuned_bundled/merge.py
"""
import json
from pathlib import Path

from genie_fast.grid_store import GridFileError, GridTable, _ids, _needed_id, load_table
from genie_fast.models import load_default

HERE = Path(__file__).resolve().parent
OUT = HERE.parents[2] / "genie_fast" / "assets" / "fmnist_genie.grids.json"

tables = [load_table(HERE / name) for name in ("fmnist_genie.grids.json", "guided.grids.json")]
weights = {t.weights for t in tables if t.records}
if len(weights) != 1:
    raise GridFileError(f"the tuning runs' grids are for {len(weights)} sets of weights: {weights}")
def worse(r):
    held = r.get("held_out") or {}
    return held.get("best_fixed_median") is not None and held["median"] > held["best_fixed_median"]


records = [r for t in tables for r in t.records.values()]
for r in filter(worse, records):
    print(f"left out: {r['solver']} {r['steps']} steps, guidance {r['guidance_scale']}: held-out "
          f"{r['held_out']['median']:.4g} > best fixed {r['held_out']['best_fixed_median']:.4g}")
model = load_default()
full = _ids(model)[0]
for r in records:  # a record tuned for the bundled model: it keeps the id of what its solver reads
    if r["weights"] not in (full, _needed_id(model, r["solver"])):
        raise GridFileError(f"{r['solver']} {r['steps']} steps was tuned for other weights than the bundled model's")
    r["weights"] = _needed_id(model, r["solver"])
merged = GridTable(OUT, full, [r for r in records if not worse(r)])
OUT.write_text(json.dumps(merged.to_json(), indent=1) + "\n")
print(f"wrote {OUT}: {len(merged.records)} grids: {merged.describe()}")
