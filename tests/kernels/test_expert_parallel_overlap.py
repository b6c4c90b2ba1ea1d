"""Expert parallelism with the overlapped all-to-all (`kernels.moe.expert_parallel_segments`) on 2 gloo processes:
outputs and every gradient (tokens, expert weights, biases, routing weights, grouped LoRA factors) equal the
single-device twin `experts_reference` over all ranks' tokens, on both backends (`grouped_mm`, loop-free and
overlapped, as a GPU runs it, and `segments`, a CPU's, not overlapped), for routings where copies travel both ways,
where none leaves its rank and where all do, and with an emulated low-precision GEMM (`quant`, where every copy
travels); and in the backward the own copies' experts run while the received copies' gradients travel back."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
from ranks import start_ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2
E, K, D, I, R = 4, 2, 8, 8, 3  # experts, top-k, width, expert width (16-byte rows for _grouped_mm), LoRA rank
BASE = ("w_up", "w_down", "b_up", "b_down")


def _routing(kind, rank, t, g):
    """(t, K) expert ids: "mixed" random; "local" only this rank's experts; "remote" only the other rank's."""
    if kind == "mixed":
        return torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)])
    owner = rank if kind == "local" else 1 - rank
    per = E // WORLD
    return torch.stack([owner * per + torch.randperm(per, generator=g)[:K] for _ in range(t)])


def _run(fn, params, x, idx, w, quant, **kw):
    """fn (experts_reference or experts_grouped) with gated experts, biases and LoRA; with `quant`, no LoRA (they do
    not mix) and a plain linear as experts_grouped's "quantized" GEMM."""
    from hybridmoe.kernels.moe import ExpertLoRA, experts_grouped

    lora = ExpertLoRA(up=(params["a_up"], params["bl_up"]), down=(params["a_down"], params["bl_down"]), scaling=1.5)
    if quant:
        lora = None
        kw |= {"quant": torch.nn.functional.linear} if fn is experts_grouped else {}
    return fn(
        x, params["w_up"], params["w_down"], idx, w, activation="silu_gated", b_up_EU=params["b_up"],
        b_down_ED=params["b_down"], lora=lora, **kw,
    )  # fmt: skip


def _scaled_error(actual, expected):
    """max|actual - expected| / (1 + max|expected|)"""
    return ((actual - expected).abs().max() / (1 + expected.abs().max())).item()


def _worker(rank, world, store, out_dir):
    from hybridmoe.kernels import moe

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    order = []  # the backward's order of the dispatch's wait / start and the own copies' experts
    for cls, name in ((moe._AllToAllWait, "wait"), (moe._AllToAllStart, "start")):
        real = cls.backward
        cls.backward = staticmethod(lambda ctx, g, real=real, name=name: order.append(name) or real(ctx, g))

    class _Mark(torch.autograd.Function):
        @staticmethod
        def forward(ctx, y):
            return y.view_as(y)

        @staticmethod
        def backward(ctx, g):
            order.append("own experts")
            return g

    real_run = moe._run_experts
    calls = []

    def run_experts(*args, **kwargs):
        calls.append(1)
        y = real_run(*args, **kwargs)
        own = len(calls) == 1 and kwargs["quant"] is None and kwargs["backend"] == "grouped_mm"  # overlapped
        return _Mark.apply(y) if own else y

    moe._run_experts = run_experts
    results = {}
    try:
        cases = [(kind, backend) for kind in ("mixed", "local", "remote") for backend in ("grouped_mm", "segments")]
        for kind, backend in [*cases, ("mixed", "quant")]:
            g = torch.Generator().manual_seed(len(kind))  # the same weights and all ranks' tokens everywhere
            full = {
                "w_up": torch.randn(E, 2 * I, D, generator=g) / D**0.5,
                "w_down": torch.randn(E, D, I, generator=g) / I**0.5,
                "b_up": 0.1 * torch.randn(E, 2 * I, generator=g),
                "b_down": 0.1 * torch.randn(E, D, generator=g),
                "a_up": 0.5 * torch.randn(E, R, D, generator=g),
                "bl_up": 0.5 * torch.randn(E, 2 * I, R, generator=g),
                "a_down": 0.5 * torch.randn(E, R, I, generator=g),
                "bl_down": 0.5 * torch.randn(E, D, R, generator=g),
            }
            xs, idxs, ws, cots = [], [], [], []
            for r in range(world):
                t = 5 + 3 * r
                xs.append(torch.randn(t, D, generator=g))
                idxs.append(_routing(kind, r, t, g))
                ws.append(torch.rand(t, K, generator=g))
                cots.append(torch.randn(t, D, generator=g))
            quant = backend == "quant"

            ref_p = {n: v.clone().requires_grad_() for n, v in full.items()}
            ref_x = [x.clone().requires_grad_() for x in xs]
            ref_w = [w.clone().requires_grad_() for w in ws]
            ref = [_run(moe.experts_reference, ref_p, x, ix, w, quant) for x, ix, w in zip(ref_x, idxs, ref_w)]
            sum((o * c).sum() for o, c in zip(ref, cots)).backward()

            per = E // world
            mine = slice(rank * per, (rank + 1) * per)
            p = {n: v[mine].clone().requires_grad_() for n, v in full.items()}
            x, w = xs[rank].clone().requires_grad_(), ws[rank].clone().requires_grad_()
            order.clear()
            calls.clear()
            be = "segments" if quant else backend
            out = _run(moe.experts_grouped, p, x, idxs[rank], w, quant, ep_group=dist.group.WORLD, backend=be)
            (out * cots[rank]).sum().backward()
            pairs = {"out": (out, ref[rank]), "x": (x.grad, ref_x[rank].grad), "topk_w": (w.grad, ref_w[rank].grad)}
            pairs |= {n: (p[n].grad, ref_p[n].grad[mine]) for n in full if not quant or n in BASE}
            errors = {n: _scaled_error(a, b) for n, (a, b) in pairs.items()}
            results[f"{kind}-{backend}"] = {"errors": errors, "order": list(order)}
        with open(os.path.join(out_dir, f"ep-{rank}.json"), "w") as fh:
            json.dump(results, fh)
    finally:
        dist.destroy_process_group()


def test_overlapped_expert_parallelism_matches_reference(tmp_path):
    start_ranks(_worker, (WORLD, str(tmp_path / "store"), str(tmp_path)), nprocs=WORLD)
    for rank in range(WORLD):
        results = json.loads((tmp_path / f"ep-{rank}.json").read_text())
        assert len(results) == 7
        for case, result in results.items():
            assert all(v <= 1e-5 for v in result["errors"].values()), (rank, case, result["errors"])
            # grouped_mm: the received copies' gradients are sent (wait's backward) before the own copies' experts
            # run, and waited for (start's backward) after; segments and quant: all copies travel, nothing overlaps
            expected = ["wait", "own experts", "start"] if case.endswith("grouped_mm") else ["wait", "start"]
            assert result["order"] == expected, (rank, case, result["order"])
