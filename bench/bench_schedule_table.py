"""schedule_table: the VP coefficient table computed on the device vs the host table
(schedule.coeff_table, then copied to the device: a host round trip for a device grid).

This runs once per sampling call (outside the step loop), so the figure that matters is that
the device path needs no host sync; the times are for the record.

    python bench/bench_schedule_table.py
"""
import argparse

import torch

from genie_fast import ops
from genie_fast.schedule import VPSchedule, coeff_table, time_grid

import _step_bench


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, nargs="+", default=[10, 1000])
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    s = VPSchedule()
    rows = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        for n in args.steps:
            ts = time_grid(s, n).to(device)
            fns = {"host_coeff_table": lambda: coeff_table(s, ts).to(ts.device)}
            for b in ops.available_backends("schedule_table", device):
                if b != "torch":
                    fns[b] = (lambda b: lambda: ops.schedule_table(s, ts, backend=b))(b)
            timer = _step_bench.time_cuda if device == "cuda" else _step_bench.time_cpu
            res = timer(fns, 10, 20)
            env = _step_bench.environment(1 if device == "cpu" else None)
            for name, r in res.items():
                rows.append({"op": "schedule_table", "device": device, "backend": name, "steps": n, **r, **env})
            print(f"[{device}, {n} steps] " + ", ".join(f"{k} {v['median_us']:.1f} us" for k, v in res.items()))
    if not args.no_write:
        _step_bench.write_rows("schedule_table", rows, None)


if __name__ == "__main__":
    main()
