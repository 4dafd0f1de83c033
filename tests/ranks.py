"""Tests on two ranks (gloo, CPU) in one pytest process: each spawned process joins the process
group, runs a worker that asserts for itself, and leaves; a failure on either rank fails the test
with that rank's traceback."""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, *args, world: int = WORLD) -> None:
    """Runs ``worker(rank, *args)`` on ``world`` ranks of a gloo process group."""
    mp.spawn(_run, args=(worker, world, free_port(), args), nprocs=world, join=True)


def _run(rank: int, worker, world: int, port: int, args) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # A rank that misses a collective fails the test in a minute, not in gloo's default 30.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        worker(rank, *args)
    finally:
        dist.destroy_process_group()
    exit_without_static_destructors()


def exit_without_static_destructors() -> None:
    """Ends a worker whose work is done and checked. torch 2.13 and 2.14 abort now and then in the
    C++ static destructors of a process that ran FSDP2 over gloo ("terminate called without an
    active exception"; a plain torch.optim FSDP2 loop, without fused_opt, did so in 1 run of 12
    here), which mp.spawn would report as a failure of the test."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
