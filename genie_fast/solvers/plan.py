"""The device plan of a run: its grid checked, every per-step coefficient and network time on the
device, built once (see the package docstring, "Capture safety")."""
from __future__ import annotations

import torch

from .. import ops
from ..schedule import VPSchedule, coeff_table


def check_grid(ts) -> torch.Tensor:
    """ts as host float64 (N + 1,), checked: at least two positive, strictly monotone times."""
    ts = torch.as_tensor(ts, dtype=torch.float64).detach().cpu().flatten()
    if len(ts) < 2:
        raise ValueError("ts needs at least two times (one step)")
    if not bool(torch.isfinite(ts).all()):
        raise ValueError(f"ts must hold finite times, got {ts.tolist()}")
    d = ts[1:] - ts[:-1]
    if not (bool((d < 0).all()) or bool((d > 0).all())) or not bool((ts > 0).all()):
        raise ValueError("ts must be positive and strictly monotone (decreasing: sampling, increasing: "
                         f"encoding), got {ts.tolist()}")
    return ts


def _per_sample(values: torch.Tensor, batch: int) -> torch.Tensor:
    """(M,) -> (M, B) contiguous: row n is what the network (or a JVP primal) gets for every sample."""
    return values[:, None].expand(-1, batch).contiguous()


class Plan:
    """The device-side constants of one run, built once per (schedule, ts, batch, device, dtype).

    rows: (N, len(COEFF_COLUMNS)) float64 coefficient table on the device; for a `VPSchedule` on a
        CPU or CUDA device the fused `ops.schedule_table` computes it there from the grid (one
        host-to-device copy of N + 1 times), other schedules copy the host `coeff_table`;
    t, t_net: (N + 1, B) continuous times and network (model) times in the state dtype;
    gammas: host float64 gamma at the grid times, for solver weights computed on the host.
    Solver-specific tables (`table`, `times`, `weights`) are built on their first use and kept:
    a solver's first run fills the plan, later runs only read it (no host-to-device copy), which
    is what makes a run after the first capturable.
    """

    def __init__(self, schedule, ts, batch: int, device, state_dtype=torch.float32, backend: str = "auto"):
        if state_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"the ODE state is float32 or float64, got {state_dtype}")
        self.schedule, self.batch, self.backend = schedule, int(batch), backend
        self.device, self.state_dtype = torch.device(device), state_dtype
        self.ts = check_grid(ts)
        self.num_steps = len(self.ts) - 1
        self.increasing = bool(self.ts[1] > self.ts[0])
        self.gammas = schedule.gamma(self.ts)
        self.rows = self._coefficients(self.ts)
        self.t = self._device(_per_sample(self.ts.to(state_dtype), self.batch))
        self.t_net = self._device(_per_sample(schedule.model_time(self.ts.to(state_dtype)), self.batch))
        self._cache: dict[str, torch.Tensor] = {}

    def _device(self, host: torch.Tensor, dtype=None) -> torch.Tensor:
        return host.to(self.device, dtype or host.dtype)

    def _coefficients(self, ts: torch.Tensor) -> torch.Tensor:
        if type(self.schedule) is VPSchedule and self.device.type in ("cpu", "cuda"):
            return ops.schedule_table(self.schedule, ts.to(self.device), backend=self.backend)
        return coeff_table(self.schedule, ts).to(self.device)

    def _cached(self, name, build):
        value = self._cache.get(name)
        if value is None:
            value = self._cache[name] = build()
        return value

    def table(self, name: str, times) -> torch.Tensor:
        """The coefficient table of another grid, times() -> host times (e.g. half steps), on the device."""
        return self._cached(name, lambda: self._coefficients(check_grid(times())))

    def times(self, name: str, times) -> torch.Tensor:
        """(M, B) network times of times() -> host float64 times, in the state dtype, on the device."""
        return self._cached(name, lambda: self._device(_per_sample(
            self.schedule.model_time(torch.as_tensor(times(), dtype=torch.float64).to(self.state_dtype)),
            self.batch)))

    def weights(self, name: str, build) -> torch.Tensor:
        """Per-step solver weights: build() -> host float64 values, kept on the device in the state dtype."""
        return self._cached(name, lambda: self._device(torch.as_tensor(build(), dtype=torch.float64),
                                                       self.state_dtype))

    def check(self, x: torch.Tensor, ts, schedule, state_dtype):
        """Refuse a plan built for another run (a wrong plan would silently give wrong samples)."""
        if (self.batch, self.device, self.state_dtype) != (x.shape[0], x.device, state_dtype) \
                or self.schedule is not schedule:
            raise ValueError(f"plan built for batch {self.batch}, {self.device}, {self.state_dtype}, "
                             f"{self.schedule!r}; this run has batch {x.shape[0]}, {x.device}, "
                             f"{state_dtype}, {schedule!r}")
        if ts is not self.ts and not torch.equal(torch.as_tensor(ts, dtype=torch.float64).cpu().flatten(), self.ts):
            raise ValueError("plan built for another time grid")
