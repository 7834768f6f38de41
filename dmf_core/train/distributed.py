"""Process-group setup from torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``), and
what a rank sets up from it: its device (:func:`rank_device`), its torch threads
(:func:`rank_threads`) and TF32 (:func:`set_rank_settings`, or :func:`rank_settings` for a block).

Imports nothing of dmf_core, so that the ``encode_captions`` stage, which encodes as a pretraining
rank would, uses these without importing the training loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def rank_device(local_rank: int = 0, device: str | None = None) -> torch.device:
    """The device of the rank with ``local_rank`` on its machine: ``device`` (``cpu`` or ``cuda``),
    else the environment variable ``DMF_DEVICE``, else CUDA when there is one."""
    kind = device or os.environ.get("DMF_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device("cuda", local_rank) if kind == "cuda" else torch.device("cpu")


def rank_threads(threads: int, device: torch.device, ranks_per_machine: int | None = None) -> int:
    """A rank's torch threads: ``threads`` (``train.threads``) is per machine, so the CPU ranks
    of one machine share it; a GPU rank uses them all. ``ranks_per_machine``: default torchrun's
    ``LOCAL_WORLD_SIZE`` (1 without torchrun)."""
    if device.type == "cuda":
        return threads
    if ranks_per_machine is None:
        ranks_per_machine = _env_int("LOCAL_WORLD_SIZE", 1)
    return max(1, threads // max(ranks_per_machine, 1))


def set_rank_settings(threads: int, device: torch.device) -> None:
    """What a training rank sets for the whole process: its torch threads and, on CUDA, TF32."""
    torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@contextlib.contextmanager
def rank_settings(threads: int, device: torch.device):
    """:func:`set_rank_settings` for the block only: the thread count and TF32 flags it found are
    set again on leaving it, so a caller in a longer-lived process (a test session) keeps its own."""
    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    set_rank_settings(threads, device)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1:]


def init_distributed(device: str | None = None) -> DistInfo:
    """Read the ranks torchrun sets and join the process group (nccl on CUDA, gloo on CPU).

    ``device`` forces ``cpu`` or ``cuda``; by default CUDA is used when available. The
    environment variable ``DMF_DEVICE`` does the same from outside (:func:`rank_device`).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    dev = rank_device(local_rank, device)
    if dev.type == "cuda":
        torch.cuda.set_device(local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                device_id=dev if dev.type == "cuda" else None)
        log.info("rank %d/%d joined the %s process group on %s", rank, world_size, backend, dev)
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=dev)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (in place), a no-op in a single process."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last step of an epoch the
    ranks' running statistics differ by that step's local update; this makes them equal again.
    """
    if dist.is_initialized():
        for buf in module.buffers():
            dist.broadcast(buf, src=src)


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch (all devices) generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
