"""Starting the multi-rank tests' processes.

`torch.multiprocessing.start_processes` with the "spawn" method starts a fresh interpreter per rank, and each one
imports torch, transformers and hybridmoe again: about 1.2 s of CPU a rank, 10 s for the 8 ranks of one layout on 2
cores. Here the ranks are forked from multiprocessing's fork server instead, which imports those modules once for
the whole suite (`multiprocessing.set_forkserver_preload`) and runs nothing else, so no threads or torch state are
inherited. Like spawned ranks, forked ones get their work only through `args`; their environment is the one the
fork server started with (each worker sets its own distributed variables).
"""

from __future__ import annotations

import multiprocessing

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
