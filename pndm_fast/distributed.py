"""One process per device, launched by torchrun: who am I (rank), how many are we (size), which GPU is mine.

torchrun (or any launcher that follows its convention) sets RANK, WORLD_SIZE and LOCAL_RANK (and MASTER_ADDR,
MASTER_PORT for the rendezvous). Without them this is a single process, World(0, 1, 0), and every function here
is a no-op, so the same code runs under `pndm-fast ...` and `torchrun --nproc_per_node K -m pndm_fast ...`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int  # 0 .. size - 1 over all nodes
    size: int  # number of processes over all nodes
    local_rank: int  # 0 .. processes on this node - 1: the index of this process's GPU

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints summaries and writes shared files."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def world() -> World:
    """This process's place, from torchrun's RANK, WORLD_SIZE, LOCAL_RANK; World(0, 1, 0) when they are absent."""
    size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    return World(rank=rank, size=size, local_rank=_env_int("LOCAL_RANK", rank if size > 1 else 0))


def backend_for(device_type: str) -> str:
    """NCCL between GPUs (all-reduce over NVLink / InfiniBand), gloo between CPU processes."""
    return "nccl" if device_type == "cuda" else "gloo"


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init(device_type: str) -> World:
    """Join the process group when WORLD_SIZE > 1 (calling it again is harmless); on cuda bind this process to
    cuda:LOCAL_RANK first, so that NCCL and every later `device="cuda"` use this process's own GPU."""
    w = world()
    if device_type == "cuda" and w.size > 1:
        torch.cuda.set_device(w.local_rank)
    if w.size > 1 and not is_initialized():
        kwargs = {}
        if device_type == "cuda":
            # Binds the communicator to this GPU up front; without it NCCL guesses the device on first use.
            kwargs["device_id"] = torch.device("cuda", w.local_rank)
        dist.init_process_group(backend=backend_for(device_type), init_method="env://", **kwargs)
    return w


def device_for(device: str, w: World | None = None) -> str:
    """`--device cuda` means this process's GPU, cuda:LOCAL_RANK, when several processes share a node; an explicit
    index (cuda:3) or cpu is kept as given."""
    w = w or world()
    if device == "cuda" and w.size > 1:
        return f"cuda:{w.local_rank}"
    return device


def barrier() -> None:
    """Wait until every rank gets here; nothing to wait for in a single process."""
    if is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def shutdown() -> None:
    """Leave the process group (a no-op when none was joined), so the process exits without NCCL's warning."""
    if is_initialized():
        dist.destroy_process_group()
