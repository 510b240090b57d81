"""Collect bench/results/head_lab/*.json (runs + timing.json) into sweep.json and print a markdown table.

    .venv/bin/python bench/head_lab/summarise.py
"""
import json
from pathlib import Path

RES = Path(__file__).resolve().parents[2] / "bench" / "results" / "head_lab"


def main():
    timing = json.loads((RES / "timing.json").read_text()) if (RES / "timing.json").exists() else {"heads": {}}
    runs = {}
    for f in sorted(RES.glob("*.json")):
        if f.name in ("timing.json", "sweep.json"):
            continue
        d = json.loads(f.read_text())
        runs[f.stem] = d
    rows = []
    print("| run | params | % U-Net | time % | steps | n_train | train loss (last 50) | train rel | "
          "test pooled | traj pooled | test null / labelled | test low4 / high4 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k, d in runs.items():
        tm = timing["heads"].get(d["name"], {})
        e = d["evals"][-1]
        lc = d["loss_curve"][-1] if d["loss_curve"] else {"loss": float("nan"), "train_rel": float("nan")}
        row = {"run": k, "head": d["name"], "params": d["params"], "params_pct": tm.get("params_pct"),
               "time_pct": tm.get("time_pct"), "steps": e["step"], "n_train": d.get("n_train"),
               "train_loss": lc["loss"], "train_rel": lc["train_rel"], "test": e["test"]["pooled"],
               "traj": e["traj"]["pooled"], "evals": [{"step": x["step"], "test": x["test"]["pooled"],
                                                       "traj": x["traj"]["pooled"]} for x in d["evals"]]}
        rows.append(row)
        print(f"| {k} | {d['params']:,} | {tm.get('params_pct', float('nan')):.1f} | {tm.get('time_pct', float('nan')):.1f} "
              f"| {e['step']} | {d.get('n_train', '-')} | {lc['loss']:.3f} | {lc['train_rel']:.3f} | "
              f"{e['test']['pooled']:.3f} | {e['traj']['pooled']:.3f} | {e['test']['pooled_null']:.3f} / "
              f"{e['test']['pooled_labelled']:.3f} | {e['test']['pooled_low4']:.3f} / {e['test']['pooled_high4']:.3f} |")
    (RES / "sweep.json").write_text(json.dumps({"timing": timing, "table": rows, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
