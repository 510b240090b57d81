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


def bins(runs=("shipped_init_bundled", "shipped_scratch", "hyb", "hyb_rich", "hyb_rich_x2", "mr_s")):
    """Per-t-bin pooled error (test, forward process) and each bin's share of the squared error."""
    import sys
    have = [r for r in runs if (RES / f"{r}.json").exists()]
    ds = {r: json.loads((RES / f"{r}.json").read_text())["evals"][-1]["test"] for r in have}
    first = ds[have[0]]["per_t_bin"]
    print("| t bin | " + " | ".join(have) + " | share of err (bundled) |")
    print("|---" * (len(have) + 2) + "|")
    for i, row in enumerate(first):
        print(f"| {row['t_lo']:.3f}-{row['t_hi']:.3f} | " + " | ".join(f"{ds[r]['per_t_bin'][i]['pooled']:.3f}" for r in have)
              + f" | {row['share_of_err']:.2f} |")
    print()
    print("| run | low4 rel (err of 4x4-block means / their target energy) | high4 rel | null | labelled |")
    print("|---|---|---|---|---|")
    for r in have:
        e = ds[r]
        fl = e["target_low4_energy_frac"] if "target_low4_energy_frac" in e else 0.16635
        print(f"| {r} | {e['pooled_low4'] / fl ** 0.5:.3f} | {e['pooled_high4'] / (1 - fl) ** 0.5:.3f} | "
              f"{e['pooled_null']:.3f} | {e['pooled_labelled']:.3f} |")


if __name__ == "__main__" and len(__import__("sys").argv) > 1 and __import__("sys").argv[1] == "bins":
    bins()
