"""Helpers for tests that spawn CPU processes joined in a gloo process group (torch.multiprocessing.spawn)."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(*, rank: int, world_size: int, port: int) -> Iterator[object]:
    """In a spawned worker: join the gloo group and yield its trainer DistEnv; the group is destroyed after, also on
    a failure (so the other ranks fail instead of hanging)."""
    import torch

    from flux2_lora_pack.trainer import parallelize

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        yield parallelize.DistEnv(rank=rank, world_size=world_size, local_rank=rank, device=torch.device("cpu"))
    finally:
        torch.distributed.destroy_process_group()
