"""The process group of a job started by torchrun (`ProcessGroup`): rank, world size, the few
collectives ``genie-fast generate`` needs, and an orderly teardown; a single process otherwise.

Processes start from torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) with gloo
on CPUs and NCCL on GPUs."""
from __future__ import annotations

import os
import time

import torch

__all__ = ["ProcessGroup", "RankFailed"]


class RankFailed(RuntimeError):
    """Raised on the ranks that did not fail when another rank of the job did (`ProcessGroup.failed`):
    the failing rank raises (and prints) its own error; the others stop with this one line."""


class ProcessGroup:
    """Rank, world size and collectives; a single process when not started by torchrun."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.pg = 0, None
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
            self.pg, self.rank, self.world = dist, dist.get_rank(), dist.get_world_size()

    def broadcast(self, obj):
        if self.pg is None:
            return obj
        box = [obj]
        self.pg.broadcast_object_list(box, src=0)
        return box[0]

    def failed(self, failed: bool, while_waiting=None) -> int | None:
        """The lowest rank that says it failed, or None: every rank calls this at the same points
        (one small all-reduce; rank 0 calls while_waiting() about twice a second meanwhile). A rank
        that raised keeps calling it instead of leaving, so that no rank is left waiting in a
        collective for one that will never come."""
        if self.pg is None:
            return 0 if failed else None
        device = "cuda" if self.pg.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([self.rank if failed else self.world], device=device)
        work = self.pg.all_reduce(flag, op=self.pg.ReduceOp.MIN, async_op=True)
        shown = time.monotonic()
        while while_waiting is not None and not work.is_completed():
            if time.monotonic() - shown > 0.5:
                while_waiting()
                shown = time.monotonic()
            time.sleep(0.01)
        work.wait()
        first = int(flag.item())
        return None if first == self.world else first

    def barrier(self, while_waiting=None):
        """Wait for every rank; rank 0 calls while_waiting() about twice a second meanwhile."""
        if self.pg is None:
            return
        if while_waiting is None:
            self.pg.barrier()
            return
        work = self.pg.barrier(async_op=True)
        while while_waiting is not None and not work.is_completed():
            while_waiting()
            time.sleep(0.5)
        work.wait()

    def close(self):
        if self.pg is not None and self.pg.is_initialized():
            # every rank done talking before any tears its connections down (a gloo rank destroyed
            # while its peer still sends can abort in a background thread)
            self.pg.barrier()
            self.pg.destroy_process_group()
