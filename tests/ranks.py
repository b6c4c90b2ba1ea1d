"""Starting the multi-rank tests' processes.

`torch.multiprocessing.start_processes` with the "spawn" method starts a fresh interpreter per rank, and each one
imports torch, transformers and hybridmoe again: about 1.2 s of CPU a rank, 10 s for the 8 ranks of one layout on 2
cores. Here the ranks are forked from multiprocessing's fork server instead, which imports those modules once for
the whole suite (`multiprocessing.set_forkserver_preload`) and runs nothing else, so no threads or torch state are
inherited. Like spawned ranks, forked ones get their work only through `args`; their environment is the one the
fork server started with (each worker sets its own distributed variables). `run_cli_ranks` starts the command line
that way, with the environment torchrun gives its ranks.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import time

import torch
import torch.multiprocessing as mp

# What the workers import; hybridmoe.data.prepare's tokenizer workers use the same fork server (and preload the
# first and last two names themselves).
PRELOAD = [
    "hybridmoe.data.prepare",
    "torch",
    "torch.distributed.checkpoint",
    "torch.distributed.fsdp",
    "torch.distributed.tensor",
    "torch.distributed.pipelining",
    "transformers",
    "safetensors.torch",
    "hybridmoe",
    "hybridmoe.cli",
    "hybridmoe.automodel",
    "hybridmoe.distributed",
    "hybridmoe.train.pretrain",
    "hybridmoe.train.sft",
    "hybridmoe.train.rl",
    "transformers.models.auto.tokenization_auto",
]


def start_ranks(fn, args: tuple, nprocs: int, join: bool = True):
    """`fn(rank, *args)` in `nprocs` processes (`torch.multiprocessing.start_processes`), forked from the fork
    server; returns its context when `join` is False."""
    if "forkserver" not in multiprocessing.get_all_start_methods():  # not on Windows: a fresh interpreter each
        return mp.start_processes(fn, args=args, nprocs=nprocs, join=join, start_method="spawn")
    multiprocessing.set_forkserver_preload(PRELOAD)  # no effect once the server runs
    return mp.start_processes(fn, args=args, nprocs=nprocs, join=join, start_method="forkserver")


def _cli_rank(rank: int, nproc: int, port: int, argv: list[str], log_dir: str) -> None:
    from hybridmoe.cli import main

    # what torchrun gives each rank (hybridmoe.distributed reads these), and its OMP_NUM_THREADS=1
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # fmt: skip
    torch.set_num_threads(1)
    with open(os.path.join(log_dir, f"rank-{rank}.log"), "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
        code = main(argv)
        log.flush()
    if code:
        raise SystemExit(code)


def run_cli_ranks(nproc: int, argv: list[str], log_dir, timeout: float = 900) -> None:
    """`hybridmoe <argv>` on `nproc` ranks with the environment torchrun gives them, forked from the fork server.

    A torchrun launch starts its agent and then each rank as a fresh interpreter (about 4 s of CPU a rank for torch
    and hybridmoe, 10 s of wall time for 4 ranks on 2 cores); these ranks start in milliseconds. The tests that start
    `python -m torch.distributed.run` itself (two in tests/test_distributed.py) keep the launcher covered.
    Each rank's output goes to `log_dir/rank-N.log`; a rank that fails, or ranks still running after `timeout`
    seconds (killed), raise with every log's tail."""
    with socket.socket() as s:  # a free port for the rendezvous store, as torchrun --standalone picks one
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.makedirs(log_dir, exist_ok=True)
    context = start_ranks(_cli_rank, (nproc, port, list(argv), str(log_dir)), nproc, join=False)
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"still running after {timeout} s")
    except Exception as e:
        for p in context.processes:
            if p.is_alive():
                p.kill()
        tails = []
        for rank in range(nproc):
            path = os.path.join(log_dir, f"rank-{rank}.log")
            if os.path.exists(path):
                with open(path) as fh:
                    tails.append(f"--- rank {rank} ---\n{fh.read()[-3000:]}")
        raise AssertionError(f"hybridmoe {' '.join(map(str, argv))} on {nproc} ranks: {e}\n" + "\n".join(tails)) from e
