"""Adopt grids tuned for the bundled model now (files written by `bench_tuned_grids.py --store`) into
genie_fast/assets/fmnist_genie.grids.json: a record replaces the bundled one of its key only when its
held-out median error is lower (both were measured on bench_grids' seed-2026 noise against the same
RK4 references), and then keeps the bundled record's best-fixed-grid figures (measured with the
current head by recheck.py; the tuning run's come from the reference JSON's older rows); a record for
other weights is refused.

    PYTHONPATH=. python bench/results/tuned_bundled/adopt.py bench/results/tuned_ft/null.grids.json [...]
"""
import json
import sys
from pathlib import Path

from genie_fast.grid_store import GridFileError, GridTable, _ids, _valid, load_table
from genie_fast.models import load_default

OUT = Path(__file__).resolve().parents[3] / "genie_fast" / "assets" / "fmnist_genie.grids.json"

model = load_default()
bundled = load_table(OUT)
records = dict(bundled.records)
for path in sys.argv[1:]:
    for key, rec in load_table(path).records.items():
        if not _valid(rec, model):
            raise GridFileError(f"{path}: {rec['solver']} {rec['steps']} steps was tuned for other weights")
        new, old = rec["held_out"]["median"], (records.get(key) or {}).get("held_out", {}).get("median")
        if old is None or new < old:
            if old is not None:  # the fixed grids' held-out figures of the bundled record are the current head's
                for k in ("best_fixed_grid", "best_fixed_median"):
                    rec["held_out"][k] = records[key]["held_out"][k]
            records[key] = rec
        print(f"{rec['solver']} {rec['steps']} steps, guidance {rec['guidance_scale']}: held-out {new:.4g} "
              f"against {old if old is None else f'{old:.4g}'}: {'adopted' if records[key] is rec else 'kept'}")
table = GridTable(OUT, _ids(model)[0], list(records.values()))
OUT.write_text(json.dumps(table.to_json(), indent=1) + "\n")
print(f"wrote {OUT}: {len(table.records)} grids")
