"""Processes of a torchrun job: joining the group (nccl on CUDA, gloo on CPU), rank 0's
decisions shared with everyone, sums over processes. One process without torchrun."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from ..device import resolve_device
from ..errors import DistillError

log = logging.getLogger("distill.train")

DIST_TIMEOUT = timedelta(hours=2)  # the other ranks wait this long for rank 0 to build the pixel cache


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun job; rank 0 of 1 without one."""

    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False  # we joined the process group, so we leave it

    @property
    def main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """False in the processes of a torchrun job other than rank 0 (which alone prints and writes)."""
    return int(os.environ.get("RANK", "0")) == 0


def join_processes(device_name: str) -> Ranks:
    """The device, and the process group when torchrun started us: nccl on CUDA (one GPU per
    process, ``cuda:LOCAL_RANK``), gloo on CPU. A group the caller already joined is used as is."""
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return Ranks(device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise DistillError(f"LOCAL_RANK {local} but {torch.cuda.device_count()} GPUs are visible: "
                               "start at most one process per GPU (torchrun --nproc-per-node)")
        if device.index not in (None, local):
            log.warning("--device %s ignored under torchrun: process %d uses cuda:%d", device_name, local, local)
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        on_cuda = device.type == "cuda"
        dist.init_process_group("nccl" if on_cuda else "gloo", timeout=DIST_TIMEOUT,
                                device_id=device if on_cuda else None)
    return Ranks(device, dist.get_rank(), dist.get_world_size(), local, owns)


def on_main(ranks: Ranks, make: Callable):
    """``make()`` run by rank 0 alone; its result, or its DistillError, on every rank."""
    if ranks.world == 1:
        return make()
    box = [None]
    if ranks.main:
        try:
            box = [("ok", make())]
        except DistillError as e:
            box = [("error", str(e))]
    dist.broadcast_object_list(box, src=0, device=ranks.device)
    kind, value = box[0]
    if kind == "error":
        raise DistillError(value)
    return value


def all_sum(ranks: Ranks, values: list[float]) -> list[float]:
    """Element-wise sums over all processes (one collective: call it per epoch, not per step)."""
    if ranks.world == 1:
        return [float(v) for v in values]
    total = torch.tensor(values, dtype=torch.float64, device=ranks.device)
    dist.all_reduce(total)
    return total.tolist()
