"""AsyncRollouts under torchrun (2 CPU processes, gloo): rank 0 alone runs the worker, every rank gets the same
batches, and `publish` gathers a model sharded with FSDP2 from both ranks before rank 0 writes it."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
from ranks import start_ranks
from test_async_rollout import checkpoint, greedy_of, rollouts  # noqa: F401 (fixture)

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def other_model(path: str) -> HybridMoEForCausalLM:
    torch.manual_seed(1)
    return HybridMoEForCausalLM(HybridMoEConfig.from_pretrained(path))


def _rank(rank, world, port, checkpoint, out):  # noqa: F811
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        from torch.distributed.fsdp import fully_shard

        model = other_model(checkpoint)
        fully_shard(model)
        with rollouts(checkpoint, max_staleness=0) as source:
            assert (len(source.workers) == 1) == (rank == 0)
            batches = [source.next_batch(0)]
            source.publish(model, 1)
            batches.append(source.next_batch(1))
        record = [[(t.seed, t.group, t.weight_version, t.token_ids) for t in b] for b in batches]
        with open(os.path.join(out, f"rank{rank}.json"), "w") as fh:
            json.dump(record, fh)
    finally:
        dist.destroy_process_group()


def test_rank_zero_owns_the_workers_and_every_rank_gets_the_batch(checkpoint, tmp_path):  # noqa: F811
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start_ranks(_rank, (2, port, checkpoint, str(tmp_path)), nprocs=2)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert records[0] == records[1]
    expected = greedy_of(other_model(checkpoint), range(8))
    for version, batch in enumerate(records[0]):
        assert len(batch) == 4 and {v for _, _, v, _ in batch} == {version}
    assert all(tokens[3:] == expected[seed] for seed, _, _, tokens in records[0][1])  # the gathered weights
