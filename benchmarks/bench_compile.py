"""torch.compile and static shapes on this machine: training eager against `train.compile`, and the engine's decode
modes against each other (issue 16), each side by side in one process.

  train   a training step (forward, backward, AdamW) of one preset, eager against the same weights compiled block by
          block as `train.compile: true` does (`hybridmoe.train.model.compile_blocks`); the steps interleave (eager,
          compiled, compiled, eager, ...) after warm-up, the median step is reported, and so are both runs' losses
          (they must agree) and the first compiled step (the compile).
  decode  greedy decoding through `hybridmoe.serve.Engine` with each `decode_mode` (eager: the batch of dynamic
          shape; static: the padded static-shape step that CUDA graphs capture on a GPU; compile: that step through
          torch.compile), at batch 1 and 8; rounds alternate the modes and the best round of each is kept (the
          machine is shared); tokens/s counts the steps where every request decodes.

    python benchmarks/bench_compile.py                       # both parts, `tiny` training and `debug` decode
    python benchmarks/bench_compile.py --parts decode --decode-preset tiny
Results: benchmarks/results/compile.json (--out) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time

import torch

from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
from hybridmoe.serve import Engine, SamplingParams
from hybridmoe.train.model import compile_blocks
from hybridmoe.utils import atomic_write_text


def train_part(preset: str, batch: int, seq: int, steps: int) -> list[dict]:
    torch.manual_seed(0)
    config = HybridMoEConfig.from_preset(preset)
    models = {"eager": HybridMoEForCausalLM(config).train()}
    models["compiled"] = copy.deepcopy(models["eager"])
    compile_blocks(models["compiled"])
    optims = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))

    def step(kind):
        start = time.perf_counter()
        out = models[kind](ids, labels=ids, return_logits=False)
        out.loss.backward()
        optims[kind].step()
        optims[kind].zero_grad(set_to_none=True)
        return time.perf_counter() - start, float(out.loss.detach())

    compile_s, first_loss = step("compiled")
    times, losses = {"eager": [], "compiled": [first_loss]}, {"eager": [], "compiled": [first_loss]}
    losses["eager"].append(step("eager")[1])
    for i in range(steps + 1):  # the first round is warm-up
        for kind in ("eager", "compiled") if i % 2 else ("compiled", "eager"):
            dt, loss = step(kind)
            losses[kind].append(loss)
            if i:
                times[kind].append(dt)
    rows = []
    for kind in ("eager", "compiled"):
        med = statistics.median(times[kind] if kind == "eager" else times[kind][1:])
        rows.append(dict(part="train", preset=preset, mode=kind, batch=batch, seq=seq, step_s=med,
                         tokens_per_s=batch * seq / med, losses=losses[kind],
                         compile_s=compile_s if kind == "compiled" else None))  # fmt: skip
    return rows


def decode_part(preset: str, modes: list[str], rounds: int, prompt: int = 32, new: int = 64) -> list[dict]:
    torch.manual_seed(0)
    model = HybridMoEForCausalLM(HybridMoEConfig.from_preset(preset, num_nextn_predict_layers=0)).eval()
    vocab = model.config.vocab_size
    engines = {m: Engine(model, max_num_seqs=8, max_model_len=prompt + new, decode_mode=m) for m in modes}
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)

    def run(engine, batch, seed):
        g = torch.Generator().manual_seed(seed)
        for _ in range(batch):
            engine.add_request(torch.randint(0, vocab, (prompt,), generator=g).tolist(), params)
        outs, steps, decoding_s, n = {}, 0, 0.0, 0
        while engine.has_unfinished():
            all_decoding = engine.num_waiting == 0 and not any(r.prefilling for r in engine._requests.values())
            start = time.perf_counter()
            step = engine.step()
            if all_decoding and len(step) == batch:
                decoding_s += time.perf_counter() - start
                n += len(step)
            for o in step:
                outs.setdefault(o.request_id, []).extend(o.new_token_ids)
            steps += 1
        return n / decoding_s, [outs[k] for k in sorted(outs)]

    rows = []
    for batch in (1, 8):
        warm = {}
        for m, engine in engines.items():
            start = time.perf_counter()
            run(engine, batch, seed=batch)
            warm[m] = time.perf_counter() - start
        best, tokens = dict.fromkeys(modes, 0.0), {}
        for _ in range(rounds):
            for m, engine in engines.items():
                rate, tokens[m] = run(engine, batch, seed=batch)
                best[m] = max(best[m], rate)
        for m in modes:
            rows.append(dict(part="decode", preset=preset, mode=m, batch=batch, tokens_per_s=best[m],
                             warmup_s=warm[m], same_tokens_as_eager=tokens[m] == tokens[modes[0]]))  # fmt: skip
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| part | preset | mode | batch | tokens/s | vs first mode | note |", "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        first = next(x for x in rows if x["part"] == r["part"] and x["batch"] == r["batch"])
        if r["part"] == "train":
            note = f"{r['batch']} x {r['seq']}; losses {' '.join(f'{x:.5f}' for x in r['losses'][:3])}"
            note += f"; compile {r['compile_s']:.0f} s" if r["compile_s"] else ""
        else:
            note = f"warm-up {r['warmup_s']:.1f} s; greedy tokens as eager: {r['same_tokens_as_eager']}"
        lines.append(f"| {r['part']} | {r['preset']} | {r['mode']} | {r['batch']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tokens_per_s'] / first['tokens_per_s']:.2f}x | {note} |")  # fmt: skip
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="train,decode")
    p.add_argument("--train-preset", default="tiny")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=6, help="timed steps per side")
    p.add_argument("--decode-preset", default="debug")
    p.add_argument("--decode-modes", default="eager,static,compile")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "compile.json"))
    args = p.parse_args()
    parts = args.parts.split(",")
    if set(parts) - {"train", "decode"}:
        p.error(f"unknown --parts {args.parts}: use train, decode or both")
    from hybridmoe.kernels.linear import _cpu_has_native_bf16

    bf16 = "native bf16 matmuls (AVX512-BF16/AMX)" if _cpu_has_native_bf16() else "no native bf16 matmuls"
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {bf16}, torch {torch.__version__}"
    rows = []
    if "train" in parts:
        rows += train_part(args.train_preset, args.batch, args.seq, args.steps)
    if "decode" in parts:
        rows += decode_part(args.decode_preset, args.decode_modes.split(","), args.rounds)
    table = markdown(rows)
    print(f"# {machine}, {torch.get_num_threads()} threads, fp32, load average {os.getloadavg()[0]:.1f}\n{table}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    result = dict(machine=machine, threads=torch.get_num_threads(), started=time.strftime("%Y-%m-%d %H:%M:%S"),
                  load_average=os.getloadavg()[0], rows=rows)  # fmt: skip
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
