"""NVFP4 checkpoints side by side with BF16 (issue 17): size on disk, resident weight memory, perplexity, decode speed.

The model: the speedrun's pretrained `tiny` (`/work/runs/sr4/pretrain`, its newest checkpoint; `--checkpoint` takes
any model directory with its tokenizer, or a run directory). When that is absent (CI machines), the script makes a
`debug`-preset model with random weights and a tokenizer trained on hybridmoe's sources in a few seconds (also with
`--synthetic`): the
pipeline runs end to end, but its perplexities and their delta mean nothing (the result says `"synthetic": true`).

  BF16    the checkpoint loaded and saved in BF16 (the speedrun stores FP32; BF16 is the baseline NVFP4 is sized
          against, with the router kept FP32 as every hybridmoe checkpoint keeps it)
  NVFP4   `hybridmoe quantize CHECKPOINT --format nvfp4` with its defaults (calibration on hybridmoe's sources,
          the published Nemotron 3 Nano exclusions), loaded packed; both models compute in BF16

Measured: bytes on disk (model files, and the tensors of the quantized layers alone), resident bytes of parameters and
buffers (all, and of the quantized layers), validation loss / perplexity on the speedrun's held-out documents (the
library-modules shards' "val" split at val_fraction 0.02, windows of 512 tokens, as the speedrun validates; with
`--val-batches N` only the first N batches of 8 windows), and greedy decode speed at batch 1 (a 64-token prompt from
the validation data, `--decode-tokens` new tokens, eos ignored; the best of `--repeats` runs, the two models
alternating so that a busy machine slows both alike).

    python benchmarks/bench_nvfp4_checkpoint.py                       # the speedrun's checkpoint (or a made one)
    python benchmarks/bench_nvfp4_checkpoint.py --checkpoint DIR --data PREPARED_DIR
    python benchmarks/bench_nvfp4_checkpoint.py --shapes      # resident weights at the Nemotron 3 shapes, in seconds
Results: benchmarks/results/nvfp4_checkpoint.json and a markdown table on stdout.

`--shapes` builds each Nemotron 3 preset on the meta device (shapes, no weights) in BF16, then packs it as
`from_pretrained` packs an NVFP4 checkpoint of it with the default exclusions, and counts the resident bytes of both
(`hybridmoe.quant.modules.weight_bytes`): what the per-weight ratio becomes for a whole model whose routed experts
dominate, which `tiny` cannot show. Results: benchmarks/results/nvfp4_shapes.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time

import torch

SPEEDRUN = "/work/runs/sr4"
SHAPES = ("tiny", "nano-30b-a3b", "super-120b-a12b", "ultra-550b-a55b")


def model_bytes_on_disk(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def quantized_bytes_on_disk(path: str, modules: list[str]) -> int:
    """Bytes of the tensors of `modules` (checkpoint module names, per expert) in a model directory's files."""
    from safetensors import safe_open

    total = 0
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), "pt") as fh:
                for key in fh.keys():  # noqa: SIM118
                    if key.rsplit(".", 1)[0] in modules:
                        t = fh.get_slice(key)
                        total += math.prod(t.get_shape()) * {"U8": 1, "F8_E4M3": 1, "F32": 4, "BF16": 2}[t.get_dtype()]
    return total


def quantized_module_names(model) -> list[str]:
    """Checkpoint names of the packed modules (routed experts one per expert and projection)."""
    from hybridmoe.quant.modules import NVFP4Experts, packed_modules

    names = []
    for name, m in packed_modules(model).items():
        if isinstance(m, NVFP4Experts):
            names += [f"{name}.{e}.{p}" for e in range(m.num_experts) for p in ("up_proj", "down_proj")]
        else:
            names.append(name)
    return names


def weights_at_shapes(config) -> dict:
    """Resident weight bytes (parameters and buffers) of `config`'s model in BF16 (routers FP32) and packed in NVFP4
    as `from_pretrained` packs it with the default exclusions, both built on the meta device."""
    from hybridmoe import HybridMoEForCausalLM
    from hybridmoe.quant.layout import default_exclude_modules, pack_for_loading, quantization_config
    from hybridmoe.quant.modules import weight_bytes

    model = HybridMoEForCausalLM(config, device="meta", dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    bf16 = weight_bytes(model)["total"]
    pack_for_loading(model, quantization_config(default_exclude_modules(model)))
    packed = weight_bytes(model)
    return {
        "parameters": params,
        "bf16_bytes": bf16,
        "nvfp4_bytes": packed["total"],
        "nvfp4_bytes_quantized_layers": packed["quantized"],
        "ratio": bf16 / packed["total"],
    }


def shapes(out: str) -> int:
    from hybridmoe import HybridMoEConfig

    rows = {name: weights_at_shapes(HybridMoEConfig.from_preset(name)) for name in SHAPES}
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(rows, fh, indent=1)

    def size(n: int) -> str:
        return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"

    print("| preset | parameters | BF16 | NVFP4 | ratio |\n|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['parameters'] / 1e9:.2f}B | {size(r['bf16_bytes'])} | {size(r['nvfp4_bytes'])} | "
              f"{r['ratio']:.2f}x |")  # fmt: skip
    return 0


def make_checkpoint(path: str) -> str:
    """A `debug`-preset model with random weights and a BPE tokenizer trained on hybridmoe's sources."""
    from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM
    from hybridmoe.data.tokenizer import load_tokenizer, train_tokenizer, vocab_size_of
    from hybridmoe.quant.export import default_calibration_texts

    corpus = os.path.join(path, "corpus.txt")
    os.makedirs(path, exist_ok=True)
    with open(corpus, "w") as fh:
        fh.write("\n".join(default_calibration_texts()))
    train_tokenizer([corpus], path, vocab_size=1024, show_progress=False)
    os.unlink(corpus)
    torch.manual_seed(0)
    tok = load_tokenizer(path)
    config = HybridMoEConfig.from_preset("debug", vocab_size=vocab_size_of(tok), eos_token_id=tok.eos_token_id)
    HybridMoEForCausalLM(config).save_pretrained(path)
    return path


def validation(checkpoint: str, data: str | None, val_batches: int | None):
    """Batches of the held-out documents: the prepared shards' val split (as the speedrun), or for a made model
    windows of hybridmoe's sources past the calibration's tokens."""
    from hybridmoe.data.loader import TokenDataset, validation_batches

    if data:
        return list(validation_batches([TokenDataset(data, val_fraction=0.02)], 512, 8, max_batches=val_batches))
    from hybridmoe.data.tokenizer import load_tokenizer
    from hybridmoe.quant.export import calibration_windows

    windows = calibration_windows(load_tokenizer(checkpoint), None, 512, 16384 + 8 * 512 * (val_batches or 4))
    windows = [w for w in windows[32:] if len(w) == 512]
    return [{"input_ids": torch.stack(windows[i : i + 8]), "labels": torch.stack(windows[i : i + 8])}
            for i in range(0, len(windows), 8)]  # fmt: skip


def decode_tokens_per_s(model, prompt: torch.Tensor, n: int) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=n)
        dt = time.perf_counter() - t0
    assert out.shape[1] == prompt.shape[1] + n
    return n / dt


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", help=f"model or run directory (default: {SPEEDRUN}/pretrain, else a made model)")
    p.add_argument("--data", help=f"prepared validation shards (default: {SPEEDRUN}/data/modules)")
    p.add_argument("--synthetic", action="store_true", help="use a made model even when the speedrun's exists")
    p.add_argument("--val-batches", type=int, help="batches of 8 x 512 tokens (default: all of the val split)")
    p.add_argument("--decode-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="the JSON to write (default: results/nvfp4_checkpoint.json, nvfp4_shapes.json)")
    p.add_argument("--shapes", action="store_true", help="only the resident weights at the Nemotron 3 shapes")
    args = p.parse_args()
    results = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    if args.shapes:
        return shapes(args.out or os.path.join(results, "nvfp4_shapes.json"))
    args.out = args.out or os.path.join(results, "nvfp4_checkpoint.json")

    from hybridmoe import HybridMoEForCausalLM
    from hybridmoe.quant.export import quantize_checkpoint
    from hybridmoe.quant.modules import weight_bytes
    from hybridmoe.train.checkpoint import latest_checkpoint
    from hybridmoe.train.pretrain import evaluate

    torch.set_num_threads(os.cpu_count() or 1)
    work = tempfile.mkdtemp(prefix="bench-nvfp4-")
    checkpoint, data = args.checkpoint, args.data
    if checkpoint is None and not args.synthetic and os.path.isdir(f"{SPEEDRUN}/pretrain"):
        checkpoint, data = f"{SPEEDRUN}/pretrain", data or f"{SPEEDRUN}/data/modules"
    synthetic = checkpoint is None
    checkpoint = make_checkpoint(os.path.join(work, "made")) if synthetic else checkpoint
    if not os.path.isfile(os.path.join(checkpoint, "config.json")):
        checkpoint = latest_checkpoint(checkpoint) or checkpoint
    print(f"checkpoint {checkpoint}{' (made here: random weights)' if synthetic else ''}", file=sys.stderr)

    bf16_dir = os.path.join(work, "bf16")
    HybridMoEForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).save_pretrained(bf16_dir)
    nvfp4_dir = os.path.join(work, "nvfp4")
    t0 = time.perf_counter()
    summary = quantize_checkpoint(checkpoint, nvfp4_dir)
    quantize_s = time.perf_counter() - t0
    models = {
        "bf16": HybridMoEForCausalLM.from_pretrained(bf16_dir, dtype=torch.bfloat16),
        "nvfp4": HybridMoEForCausalLM.from_pretrained(nvfp4_dir, dtype=torch.bfloat16),
    }
    quantized = quantized_module_names(models["nvfp4"])
    batches = validation(checkpoint, data, args.val_batches)
    targets = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    prompt = batches[0]["input_ids"][:1, :64]
    rows = {}
    for name, model in models.items():
        path = bf16_dir if name == "bf16" else nvfp4_dir
        resident = weight_bytes(model)
        t0 = time.perf_counter()
        loss = evaluate(model, batches)
        rows[name] = {
            "disk_bytes": model_bytes_on_disk(path),
            "disk_bytes_quantized_layers": quantized_bytes_on_disk(path, quantized),
            "resident_bytes": resident["total"],
            "val_loss": loss,
            "val_ppl": math.exp(loss),
            "eval_s": round(time.perf_counter() - t0, 1),
            "decode_tokens_per_s": [],
        }
    rows["bf16"]["resident_bytes_quantized_layers"] = rows["bf16"]["disk_bytes_quantized_layers"]  # bf16 in memory
    rows["nvfp4"]["resident_bytes_quantized_layers"] = weight_bytes(models["nvfp4"])["quantized"]
    for _ in range(args.repeats):
        for name, model in models.items():
            rows[name]["decode_tokens_per_s"].append(decode_tokens_per_s(model, prompt, args.decode_tokens))
    for row in rows.values():
        row["decode_tokens_per_s"] = round(max(row["decode_tokens_per_s"]), 1)
    b, q = rows["bf16"], rows["nvfp4"]
    result = {
        "checkpoint": checkpoint,
        "synthetic": synthetic,
        "data": data or "hybridmoe sources past the calibration tokens",
        "validation_target_tokens": targets,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "quantize_seconds": round(quantize_s, 1),
        "quantize": {
            k: summary[k]
            for k in (
                "quantized_linears",
                "quantized_expert_layers",
                "uncalibrated_experts",
                "calibration_tokens",
                "exclude_modules",
            )
        },  # fmt: skip
        "bf16": b,
        "nvfp4": q,
        "ratios": {
            "disk_total": b["disk_bytes"] / q["disk_bytes"],
            "disk_quantized_layers": b["disk_bytes_quantized_layers"] / q["disk_bytes_quantized_layers"],
            "resident_total": b["resident_bytes"] / q["resident_bytes"],
            "resident_quantized_layers": b["resident_bytes_quantized_layers"] / q["resident_bytes_quantized_layers"],
            "quantized_share_of_bf16_weights": b["disk_bytes_quantized_layers"] / b["disk_bytes"],
            "ppl_relative_delta": q["val_ppl"] / b["val_ppl"] - 1,
            "decode_speed": q["decode_tokens_per_s"] / b["decode_tokens_per_s"],
        },
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=1)
    mib = 2**20
    r = result["ratios"]
    print(f"| | BF16 | NVFP4 | ratio |\n|---|---:|---:|---:|\n"
          f"| model files on disk | {b['disk_bytes'] / mib:.2f} MiB | {q['disk_bytes'] / mib:.2f} MiB | "
          f"{r['disk_total']:.2f}x |\n"
          f"| quantized layers on disk | {b['disk_bytes_quantized_layers'] / mib:.2f} MiB | "
          f"{q['disk_bytes_quantized_layers'] / mib:.2f} MiB | {r['disk_quantized_layers']:.2f}x |\n"
          f"| resident weights (params + buffers) | {b['resident_bytes'] / mib:.2f} MiB | "
          f"{q['resident_bytes'] / mib:.2f} MiB | {r['resident_total']:.2f}x |\n"
          f"| resident, quantized layers | {b['resident_bytes_quantized_layers'] / mib:.2f} MiB | "
          f"{q['resident_bytes_quantized_layers'] / mib:.2f} MiB | {r['resident_quantized_layers']:.2f}x |\n"
          f"| validation loss ({targets:,} tokens) | {b['val_loss']:.4f} | {q['val_loss']:.4f} | |\n"
          f"| validation perplexity | {b['val_ppl']:.2f} | {q['val_ppl']:.2f} | "
          f"{100 * r['ppl_relative_delta']:+.2f}% |\n"
          f"| decode, batch 1, greedy (tokens/s) | {b['decode_tokens_per_s']} | {q['decode_tokens_per_s']} | "
          f"{r['decode_speed']:.2f}x |")  # fmt: skip
    print(f"wrote {args.out}", file=sys.stderr)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
