"""Merge the grids files the tuning runs wrote (null class, guided) into the bundled model's
genie_fast/assets/fmnist_genie.grids.json (every grid checked; one weights hash for all):

    PYTHONPATH=. python bench/results/tuned_bundled/merge.py
"""
import json
from pathlib import Path

from genie_fast.grid_store import GridFileError, GridTable, load_table

HERE = Path(__file__).resolve().parent
OUT = HERE.parents[2] / "genie_fast" / "assets" / "fmnist_genie.grids.json"

tables = [load_table(HERE / name) for name in ("fmnist_genie.grids.json", "guided.grids.json")]
weights = {t.weights for t in tables if t.records}
if len(weights) != 1:
    raise GridFileError(f"the tuning runs' grids are for {len(weights)} sets of weights: {weights}")
merged = GridTable(OUT, weights.pop(), [r for t in tables for r in t.records.values()])
OUT.write_text(json.dumps(merged.to_json(), indent=1) + "\n")
print(f"wrote {OUT}: {len(merged.records)} grids: {merged.describe()}")
