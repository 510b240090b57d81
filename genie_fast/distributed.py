"""The process group of a job started by torchrun (`ProcessGroup`): rank, world size, the few
collectives ``genie-fast generate`` needs, and an orderly teardown; a single process otherwise.

Processes start from torchrun's environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``) with gloo
on CPUs and NCCL on GPUs."""
from __future__ import annotations

import os
import time

import torch

__all__ = ["ProcessGroup"]


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
