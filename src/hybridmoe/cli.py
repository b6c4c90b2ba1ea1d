"""`hybridmoe <command>`: parse arguments, call one stage function, print its result. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _number(kind, low: float, *, inclusive: bool = True):
    """An argparse type: `kind(text)`, refused unless at least `low` (above it where not `inclusive`)."""

    def parse(text: str):
        value = kind(text)
        if not (value >= low if inclusive else value > low):
            bound = f"{'>=' if inclusive else '>'} {low:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: give a number {bound}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its "invalid int value" message
    return parse


positive_int, nonnegative_int = _number(int, 1), _number(int, 0)
positive_float, nonnegative_float = _number(float, 0.0, inclusive=False), _number(float, 0.0)


def port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a TCP port: give 0-65535 (0: any free port)")
    return value


def device(text: str) -> str:
    """An argparse type: a torch device this machine has (`dtypes.check_device`)."""
    from .dtypes import check_device

    try:
        return check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def reasoning_budgets(text: str) -> list[int | None]:
    """An argparse type: "0,4,none" -> [0, 4, None] (`hybridmoe.eval.budget.parse_budgets`)."""
    from .eval.budget import parse_budgets

    try:
        return parse_budgets(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parse_overrides(pairs: list[str]) -> dict:
    """key=value pairs; values are read as JSON when they parse (numbers, true/false, null, lists), else strings."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"error: override {pair!r} is not key=value")
        key, value = pair.split("=", 1)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _model_dir(path: str) -> str:
    """A model directory as given, or the newest checkpoint of a run directory (e.g. runs/speedrun/long-context)."""
    from .train.checkpoint import latest_checkpoint

    if os.path.isfile(os.path.join(path, "config.json")) or not os.path.isdir(path):
        return path  # (a missing path gets the command's own error)
    return latest_checkpoint(path) or path


def _config_from_args(args):
    from .config import HybridMoEConfig

    overrides = _parse_overrides(args.overrides)
    if args.config:
        config = HybridMoEConfig.from_pretrained(args.config)
        return config.replace(**overrides) if overrides else config
    return HybridMoEConfig.from_preset(args.preset, **overrides)


def cmd_params(args) -> int:
    from .modeling import HybridMoEForCausalLM

    config = _config_from_args(args)
    counts = HybridMoEForCausalLM(config, device="meta").parameter_counts()
    if args.json:
        print(json.dumps({"total": counts["total"], "active": counts["active"]}))
        return 0
    name = args.config or args.preset
    print(f"{name}: {config.summary()}")
    print(f"  total parameters   {counts['total']:>18,}  ({counts['total'] / 1e9:.2f}B)")
    if counts["mtp"]:
        print(f"  with MTP layers    {counts['total_with_mtp']:>18,}  ({counts['total_with_mtp'] / 1e9:.2f}B)")
    print(f"  active per token   {counts['active']:>18,}  ({counts['active'] / 1e9:.2f}B)")
    return 0


def cmd_tokenizer_train(args) -> int:
    from .data.sources import TooManyBadRecords
    from .data.tokenizer import train_tokenizer

    try:
        report = train_tokenizer(
            args.inputs, args.output, vocab_size=args.vocab_size, field=args.field, min_frequency=args.min_frequency,
            max_bad_fraction=args.max_bad_fraction,
        )  # fmt: skip
    except TooManyBadRecords as e:  # the tokenizer was saved: say what it holds before the error
        print(f"tokenizer {e.report.summary()}")
        raise
    print(f"tokenizer {report.summary()}")
    return 0


def cmd_prepare(args) -> int:
    from .data.prepare import prepare
    from .data.sources import TooManyBadRecords

    try:
        report = prepare(
            args.inputs, args.tokenizer, args.output, field=args.field, workers=args.workers,
            shard_size_bytes=max(1, int(args.shard_size_mb * 2**20)), max_bad_fraction=args.max_bad_fraction,
        )  # fmt: skip
    except TooManyBadRecords as e:  # the shards and manifest were written: say what they hold before the error
        print(e.report.summary())
        raise
    print(report.summary())
    return 0


def cmd_pretrain(args) -> int:
    from .train.config import Recipe
    from .train.pretrain import pretrain

    return _run_stage(Recipe, pretrain, args)


def cmd_sft(args) -> int:
    from .train.config import SFTRecipe
    from .train.sft import sft

    return _run_stage(SFTRecipe, sft, args)


def cmd_rl(args) -> int:
    from .train.config import RLRecipe
    from .train.rl import rl

    return _run_stage(RLRecipe, rl, args)


def cmd_distill(args) -> int:
    from .train.config import DistillRecipe
    from .train.distill import distill

    return _run_stage(DistillRecipe, distill, args)


def _run_stage(recipe_class, stage, args) -> int:
    """Read and check the recipe, print it, run the stage, say how it ended (under torchrun rank 0 alone talks)."""
    recipe = recipe_class.from_yaml(args.recipe, args.overrides)
    recipe.validate()
    main_rank = os.environ.get("RANK", "0") == "0"
    if main_rank:
        print(f"recipe {args.recipe} (resolved):\n{recipe.to_yaml()}", flush=True)
    summary = stage(recipe, resume=args.resume)
    if not main_rank:
        return 0
    state = "finished"
    if summary.get("interrupted"):
        state = {"deadline": "stopped at train.time_limit_s", "signal": "interrupted"}.get(summary.get("stopped"),
                                                                                           "stopped")  # fmt: skip
    print(f"{state} at step {summary['steps']}; checkpoint {summary.get('checkpoint')}; log {summary['log']}")
    if summary.get("final_val_loss") is not None:
        print(f"validation loss {summary['final_val_loss']:.4f}")
    if summary.get("final"):
        print(f"model: {summary['final']}")
    return 0


def cmd_export(args) -> int:
    from .train.checkpoint import export_distributed_checkpoint, latest_checkpoint

    ckpt = args.checkpoint
    if not os.path.isdir(os.path.join(ckpt, "dcp")) and latest_checkpoint(ckpt):
        ckpt = latest_checkpoint(ckpt)  # a run directory: its newest checkpoint
    print(f"exported {export_distributed_checkpoint(ckpt, args.output)} (from {ckpt})")
    return 0


def cmd_quantize(args) -> int:
    from .quant.export import quantize_checkpoint

    r = quantize_checkpoint(
        _model_dir(args.checkpoint), args.output, format=args.format, calibration=args.calibration,
        exclude=args.exclude, max_tokens=args.calibration_tokens, seq_len=args.seq_len, field=args.field,
    )  # fmt: skip
    if args.json:
        print(json.dumps(r, indent=1))
        return 0
    mib = 2**20
    print(f"wrote {r['output']} ({r['format']}): {r['quantized_linears']} linear layers and "
          f"{r['quantized_expert_layers']} expert layers quantized, calibrated on {r['calibration_tokens']:,} tokens "
          f"of {r['calibration'] if isinstance(r['calibration'], str) else ', '.join(r['calibration'])}; weights "
          f"{r['weight_bytes'] / mib:.1f} MiB ({r['quantized_weight_bytes'] / mib:.1f} MiB packed) in "
          f"{r['seconds']}s")  # fmt: skip
    if r["uncalibrated_experts"]:
        print(f"  {r['uncalibrated_experts']} expert(s) got no calibration token: input_scale from their layer's max")
    if r["skipped_directories"]:
        print(f"  not copied (directories): {', '.join(r['skipped_directories'])}")
    return 0


def cmd_plan(args) -> int:
    from dataclasses import replace

    from .plan import GIB, Layout, feasible_layouts, plan

    config = _config_from_args(args)
    given = {k: getattr(args, k) for k in ("dp", "tp", "pp", "cp", "ep") if getattr(args, k) is not None}
    name = args.config or args.preset
    print(f"{name}: {config.summary()}")
    print(f"  {args.gpus} GPUs of {args.gpu_memory:g} GiB, sequence {args.seq}, {args.precision}, "
          f"runtime reserve {args.overhead_gib:g} GiB per GPU")  # fmt: skip
    if not given:
        found = feasible_layouts(
            config, args.gpus, args.gpu_memory, args.seq, args.global_batch, overhead_gib=args.overhead_gib,
            moe_imbalance=args.moe_imbalance, implemented_only=args.implemented,
        )  # fmt: skip
        if not found:
            print(f"no layout of {args.gpus} GPUs fits {args.gpu_memory:g} GiB; add GPUs or shorten --seq")
            return 1
        print(f"feasible layouts, best first (micro-batch 1; global batch {args.global_batch or 'dp'}):")
        print(f"  {'layout':<66} {'GiB/GPU':>8}")
        for p in found:
            print(f"  {p.layout.describe():<66} {p.total / GIB:8.1f}")
        return 0
    tp, pp, cp = given.get("tp", 1), given.get("pp", 1), given.get("cp", 1)
    dp = given.get("dp", args.gpus // (tp * pp * cp))
    layout = Layout(dp=dp, tp=tp, pp=pp, cp=cp, ep=given.get("ep", 1), micro_batch=args.micro_batch,
                    checkpointing=args.checkpointing)  # fmt: skip
    if layout.gpus != args.gpus:
        raise ValueError(f"dp x tp x pp x cp = {layout.gpus} but --gpus is {args.gpus}; make them agree")
    p = plan(config, layout, args.seq, args.global_batch, args.precision, args.overhead_gib, args.moe_imbalance)
    if args.json:
        keys = ("params", "grads", "optimizer", "fsdp_buffers", "activations", "moe_dispatch", "transient",
                "overhead", "total")  # fmt: skip
        out = {k: getattr(p, k) for k in keys} | {"flops_per_step": p.flops_per_step, "stage": p.stage}
        print(json.dumps(out))
        return 0
    fits = "fits" if p.total <= args.gpu_memory * GIB else "does NOT fit"
    print(f"layout: {layout.describe()}")
    print(f"per GPU (pipeline stage {p.stage}, the fullest): {fits} in {args.gpu_memory:g} GiB")
    print(p.table())
    other = plan(config, replace(layout, checkpointing=not layout.checkpointing), args.seq, args.global_batch,
                 args.precision, args.overhead_gib, args.moe_imbalance)  # fmt: skip
    print(f"  {'with' if other.layout.checkpointing else 'without'} activation checkpointing: activations "
          f"{other.activations / GIB:.2f} GiB, total {other.total / GIB:.2f} GiB")  # fmt: skip
    tokens = p.global_batch * args.seq
    print(f"FLOPs per step: {p.flops_per_step:.3e} ({tokens:,} tokens; {p.flops_per_step / layout.gpus:.3e} per GPU)")
    if args.gpu_tflops:
        seconds = p.flops_per_step / layout.gpus / (args.gpu_tflops * 1e12 * args.mfu)
        print(f"step time at {args.mfu:.0%} MFU of {args.gpu_tflops:g} TFLOP/s: {seconds:.1f} s")
    for note in p.notes:
        print(f"note: {note}")
    return 0


def cmd_speedrun(args) -> int:
    from .speedrun import speedrun

    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip()) if args.stages else None
    speedrun(minutes=args.minutes, out_dir=args.out, stages=stages, preset=args.preset)
    return 0


def cmd_posttrain(args) -> int:
    from .posttrain import PostPlan, posttrain

    plan = PostPlan(minutes=args.minutes, init_from=args.init_from, size=args.size, overrides=tuple(args.overrides),
                    compare=not args.no_compare, seed=args.seed,
                    **({"recipes": args.recipes} if args.recipes else {}),
                    **({"task_samples": args.samples} if args.samples else {}),
                    **({"budgets": () if args.no_budget_sweep else tuple(args.budgets)}
                       if args.budgets or args.no_budget_sweep else {}),
                    **({"budget_domains": tuple(d.strip() for d in args.budget_domains.split(",") if d.strip())}
                       if args.budget_domains else {}))  # fmt: skip
    posttrain(out_dir=args.out, plan=plan, command=" ".join(["hybridmoe", *sys.argv[1:]]))
    return 0


def cmd_finetune(args) -> int:
    """The alias of `hybridmoe sft` for a transformers model, with its own flags."""
    from .train.sft import finetune_recipe, sft

    recipe = finetune_recipe(
        model=args.model, data=args.data, out_dir=args.out, seq_len=args.seq_len, batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size, epochs=args.epochs, steps=args.steps,
        lr=args.lr if args.lr is not None else (1e-4 if args.lora else 1e-5), warmup_steps=args.warmup_steps,
        dtype=args.dtype, lora=args.lora, lora_r=args.lora_r, lora_alpha=args.lora_alpha,
        lora_targets=args.lora_targets.split(",") if args.lora_targets else None, lora_experts=not args.no_lora_experts,
        drop_long=args.drop_long, save_every=args.save_every, seed=args.seed, ep=args.ep,
    )  # fmt: skip
    summary = sft(recipe, resume=args.resume)
    if os.environ.get("RANK", "0") == "0":  # under torchrun only rank 0 talks
        keys = ("steps", "loss", "samples", "data", "final", "checkpoint", "interrupted", "stopped")
        print(json.dumps({"out_dir": args.out, **{k: summary[k] for k in keys if k in summary}}))
    return 0


def cmd_eval_ruler(args) -> int:
    from .eval.report import ruler_table
    from .eval.ruler import run_ruler

    report = run_ruler(
        _model_dir(args.checkpoint), args.lengths, tasks=args.tasks, samples=args.samples, out_dir=args.out,
        seed=args.seed, haystack=args.haystack, tokenizer=args.tokenizer, device=args.device, dtype=args.dtype,
    )  # fmt: skip
    print(ruler_table(report))
    print("wrote " + ", ".join(report["files"].values()))
    return 0


def cmd_eval_ppl(args) -> int:
    from .eval.perplexity import evaluate_perplexity

    r = evaluate_perplexity(
        _model_dir(args.checkpoint), args.data, seq_len=args.seq_len, max_tokens=args.max_tokens,
        batch_size=args.batch_size, field=args.field, split=args.split, out=args.out, device=args.device,
        dtype=args.dtype, verify=args.verify,
    )  # fmt: skip
    bpb = f", {r['bits_per_byte']:.4f} bits per byte" if r["bits_per_byte"] is not None else ""
    print(f"perplexity {r['perplexity']:.4f} (loss {r['loss']:.4f} nats/token{bpb}) over {r['target_tokens']:,} "
          f"tokens in {r['windows']} windows of {r['seq_len']}; wrote {r['out']}")  # fmt: skip
    return 0


def cmd_eval_tasks(args) -> int:
    from .eval.tasks import TaskEvalSettings, evaluate_tasks, resolve_domains, write_task_report
    from .serve.load import load_engine

    settings = TaskEvalSettings(
        samples=args.samples, difficulty=args.difficulty, split=args.split, offset=args.offset,
        reasoning=args.reasoning, reasoning_budget=args.reasoning_budget, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, pass_k=args.pass_k, max_new_tokens=args.max_new_tokens,
        max_tool_rounds=args.max_tool_rounds, overlap_seeds=args.overlap_seeds,
    )  # fmt: skip
    domains = resolve_domains(args.domains, args.difficulty)  # bad names and settings fail before the model loads
    checkpoint = _model_dir(args.checkpoint)
    engine, tokenizer = load_engine(checkpoint, max_num_seqs=args.max_num_seqs, seed=args.seed, **_engine_kwargs(args))
    result = evaluate_tasks(engine, tokenizer, domains, checkpoint=checkpoint, **vars(settings))
    files = write_task_report(result, args.out or os.path.join("eval", f"tasks-{os.path.basename(checkpoint)}"))
    print(result.table())
    print("wrote " + ", ".join(files.values()))
    return 0


def cmd_eval_envs(args) -> int:
    from .eval.envs import evaluate_envs, resolve_envs, write_env_report
    from .serve.load import load_engine

    envs = resolve_envs(args.envs, args.difficulty)  # bad names fail before the model loads
    checkpoint = _model_dir(args.checkpoint)
    engine, tokenizer = load_engine(checkpoint, max_num_seqs=args.max_num_seqs, **_engine_kwargs(args))
    result = evaluate_envs(
        engine, tokenizer, envs, args.samples, difficulty=args.difficulty, reasoning=args.reasoning,
        max_new_tokens=args.max_new_tokens, split=args.split, offset=args.offset, checkpoint=checkpoint,
    )  # fmt: skip
    files = write_env_report(result, args.out or os.path.join("eval", f"envs-{os.path.basename(checkpoint)}"))
    print(result.table())
    print("wrote " + ", ".join(files.values()))
    return 0


def _engine_kwargs(args) -> dict:
    return dict(device=args.device, dtype=args.dtype, max_model_len=args.max_model_len, tokenizer=args.tokenizer,
                decode_mode=getattr(args, "decode_mode", None))  # fmt: skip


def _sampling_from_args(args):
    from .serve import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)


def cmd_serve(args) -> int:
    from .serve.protocol import Limits
    from .serve.server import serve

    limits = Limits(
        max_body_bytes=int(args.max_body_mb * 2**20), max_prompt_chars=args.max_prompt_chars,
        max_prompts=args.max_prompts, max_stop=args.max_stop, max_queue=args.max_queue,
        request_timeout_s=args.request_timeout or None, header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout, max_connections=args.max_connections,
    )  # fmt: skip
    serve(
        _model_dir(args.checkpoint), host=args.host, port=args.port, model_name=args.served_model_name,
        grace_s=args.grace, reasoning_budget=args.reasoning_budget, max_num_seqs=args.max_num_seqs, limits=limits,
        api_key=args.api_key, allowed_hosts=args.allowed_host, weight_version=args.weight_version,
        **_engine_kwargs(args),
    )  # fmt: skip
    return 0


def cmd_generate(args) -> int:
    from .serve.load import load_engine
    from .serve.terminal import generate

    engine, tokenizer = load_engine(_model_dir(args.checkpoint), max_num_seqs=1, **_engine_kwargs(args))
    if args.speculative:
        from .serve.terminal import generate_speculative

        generate_speculative(engine, tokenizer, args.prompt, _sampling_from_args(args), args.speculative, args.chat)
        return 0
    generate(
        engine, tokenizer, args.prompt, _sampling_from_args(args), chat=args.chat, reasoning=not args.no_reasoning,
        reasoning_budget=args.reasoning_budget,
    )  # fmt: skip
    return 0


def cmd_chat(args) -> int:
    from .serve.load import load_engine
    from .serve.terminal import chat_loop

    engine, tokenizer = load_engine(_model_dir(args.checkpoint), max_num_seqs=1, **_engine_kwargs(args))
    chat_loop(
        engine, tokenizer, _sampling_from_args(args), system=args.system, reasoning=not args.no_reasoning,
        reasoning_budget=args.reasoning_budget,
    )  # fmt: skip
    return 0


def cmd_tasks_write(args) -> int:
    from .tasks import DOMAINS, write_sft_jsonl

    names = sorted(DOMAINS) if args.domains == "all" else [d.strip() for d in args.domains.split(",") if d.strip()]
    summary = write_sft_jsonl(
        args.out, {name: args.per_domain for name in names}, split=args.split, difficulty=args.difficulty,
        offset=args.offset, recovery_share=args.recovery_share,
    )  # fmt: skip
    recovered = "".join(f", {n} of {d} recovering from a failed call" for d, n in
                        summary["recovery_demonstrations"].items())  # fmt: skip
    print(f"wrote {summary['records']} conversations ({len(names)} domains x {args.per_domain}, {args.split} split, "
          f"difficulty {args.difficulty}{recovered}) to {summary['path']}")  # fmt: skip
    return 0


def cmd_tasks_show(args) -> int:
    from .tasks import get_domain

    task = get_domain(args.domain).generate(args.seed, args.difficulty)
    if args.json:
        print(json.dumps(task.to_dict(), indent=2, ensure_ascii=False))
        return 0
    print(f"# {task.domain}, seed {task.seed} ({task.split}), difficulty {task.difficulty}")
    if task.tools:
        print("tools: " + ", ".join(t["function"]["name"] for t in task.tools))
    for label, messages in (("prompt", task.messages), ("solution", task.solution)):
        print(f"--- {label}")
        for m in messages:
            if m.get("reasoning_content"):
                print(f"[{m['role']} reasoning] {m['reasoning_content']}")
            for call in m.get("tool_calls") or []:
                print(f"[{m['role']} tool call] {call['function']['name']}({call['function']['arguments']})")
            if m.get("content") or not (m.get("tool_calls") or m.get("reasoning_content")):
                print(f"[{m['role']}] {m.get('content')}")
    print(f"--- answer (what verify compares with)\n{json.dumps(task.answer, ensure_ascii=False)}")
    return 0


BAD_FRACTION_HELP = (
    "exit non-zero (after writing everything) when more than this fraction of the records are bad; every bad record "
    "is listed in bad_records.jsonl in the output directory"
)


def build_parser() -> argparse.ArgumentParser:
    from .dtypes import DTYPE_NAMES
    from .presets import PRESETS

    parser = argparse.ArgumentParser(prog="hybridmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="total and active parameter counts of a preset or config (built on meta)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--config", help="a config.json or model directory instead of a preset")
    p.add_argument("--json", action="store_true", help='print one line {"total": N, "active": N}')
    p.add_argument("overrides", nargs="*", help="config fields as key=value")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("tokenizer", help="train a byte-level BPE tokenizer")
    tok_sub = p.add_subparsers(dest="tokenizer_command", required=True)
    t = tok_sub.add_parser("train", help="train on text/.jsonl/.parquet files and save a transformers tokenizer dir")
    t.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories of documents")
    t.add_argument("--output", required=True, help="directory to save the tokenizer in")
    t.add_argument("--vocab-size", type=int, default=8192)
    t.add_argument("--field", default="text", help="the text field of .jsonl records / column of .parquet files")
    t.add_argument("--min-frequency", type=int, default=2, help="least count of a pair for it to be merged")
    t.add_argument("--max-bad-fraction", type=float, default=0.01, help=BAD_FRACTION_HELP)
    t.set_defaults(func=cmd_tokenizer_train)

    p = sub.add_parser("prepare", help="tokenize documents into token shards with a manifest")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files or directories of documents")
    p.add_argument("--tokenizer", required=True, help="a Hugging Face tokenizer directory")
    p.add_argument("--output", required=True, help="directory for the shards and manifest.json")
    p.add_argument("--field", default="text", help="the text field of .jsonl records / column of .parquet files")
    p.add_argument("--workers", type=int, default=2, help="worker processes")
    p.add_argument("--shard-size-mb", type=positive_float, default=64, help="input MiB per shard")
    p.add_argument("--max-bad-fraction", type=float, default=0.01, help=BAD_FRACTION_HELP)
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("pretrain", help="train from a YAML recipe (pretraining, long-context extension)")
    p.add_argument("recipe", help="a YAML recipe, e.g. recipes/tiny-pretrain.yaml")
    p.add_argument("overrides", nargs="*", help="recipe keys as section.key=value, e.g. optim.lr=3e-4")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sft", help="supervised fine-tuning on chat conversations from a YAML recipe (native or HF)")
    p.add_argument("recipe", help="a YAML SFT recipe, e.g. recipes/tiny-sft.yaml")
    p.add_argument("overrides", nargs="*", help="recipe keys as section.key=value, e.g. sft.loss_normalization=token")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("rl", help="reinforcement learning with GRPO on verifiable environments from a YAML recipe")
    p.add_argument("recipe", help="a YAML RL recipe, e.g. recipes/tiny-rl.yaml")
    p.add_argument("overrides", nargs="*", help="recipe keys as section.key=value, e.g. rl.group_size=8")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    p.set_defaults(func=cmd_rl)

    p = sub.add_parser("distill", help="multi-teacher on-policy distillation (MOPD) from a YAML recipe")
    p.add_argument("recipe", help="a YAML MOPD recipe, e.g. recipes/tiny-distill.yaml")
    p.add_argument("overrides", nargs="*", help="recipe keys as section.key=value, e.g. distill.orm_weight=0.5")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.out_dir")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("export", help="a distributed (torchrun) checkpoint -> a Hugging Face model directory")
    p.add_argument("checkpoint", help="a checkpoint directory with dcp/, or a run directory (its newest)")
    p.add_argument("output", help="directory for config.json, safetensors and the tokenizer")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quantize", help="post-training quantization to an NVFP4 checkpoint (ModelOpt layout)")
    p.add_argument("checkpoint", help="a Hugging Face model directory with its tokenizer (or a run directory)")
    p.add_argument("--format", default="nvfp4", choices=("nvfp4",))
    p.add_argument("--output", required=True, help="the new checkpoint directory (must not exist or be empty)")
    p.add_argument("--calibration", nargs="+", metavar="DATA", help="text/.jsonl/.parquet files or folders, or a "
                   "folder written by `hybridmoe prepare` (default: hybridmoe's own Python sources)")  # fmt: skip
    p.add_argument("--calibration-tokens", type=int, default=16384, help="calibration tokens at most")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    p.add_argument("--field", default="text", help="the text field of .jsonl records / column of .parquet files")
    p.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN", help="fnmatch patterns of module names "
                   "to keep in BF16, besides the defaults (LM head, attention, the Mamba layers feeding attention, "
                   "MTP, latent projections)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("plan", help="per-GPU memory and FLOPs of a training layout, or the layouts that fit")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--config", help="a config.json or model directory instead of a preset")
    p.add_argument("--gpus", type=positive_int, required=True)
    p.add_argument("--gpu-memory", type=positive_float, default=80.0, help="GiB per GPU")
    p.add_argument("--seq", type=positive_int, default=8192, help="tokens per sequence")
    p.add_argument(
        "--global-batch", type=positive_int, help="sequences per optimizer step (default: dp x micro-batch x pp)"
    )
    p.add_argument("--micro-batch", type=positive_int, default=1, help="sequences per rank per micro-step")
    for dim in ("dp", "tp", "pp", "cp", "ep"):
        p.add_argument(f"--{dim}", type=positive_int, help=f"{dim} degree (give any of dp/tp/pp/cp/ep for one layout)")
    p.add_argument("--checkpointing", action="store_true", help="full activation recomputation")
    p.add_argument(
        "--implemented",
        action="store_true",
        help="only layouts hybridmoe runs today (dp x pp x cp x tp x ep, tp splitting the heads)",
    )
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument(
        "--overhead-gib", type=nonnegative_float, default=4.0, help="reserve for CUDA context, NCCL, fragmentation"
    )
    p.add_argument("--moe-imbalance", type=_number(float, 1.0), default=1.0, help="max/mean tokens per EP rank")
    p.add_argument("--gpu-tflops", type=positive_float, help="peak TFLOP/s per GPU, to estimate the step time")
    p.add_argument("--mfu", type=positive_float, default=0.4, help="assumed MFU for the step-time estimate")
    p.add_argument("--json", action="store_true", help="one line of JSON (bytes)")
    p.add_argument("overrides", nargs="*", help="config fields as key=value")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("speedrun", help="the whole CPU pipeline on the embedded default (stdlib sources, micro)")
    p.add_argument("--minutes", type=positive_float, default=30.0, help="time budget; step counts are fitted to it")
    p.add_argument("--preset", choices=sorted(PRESETS), help="the model (default: micro, the size a 30-minute "
                   "budget affords here)")  # fmt: skip
    p.add_argument("--out", help="run directory (default: a new speedrun-<time> folder here)")
    p.add_argument("--stages", help="comma-separated stages to run, pretrain included (default: "
                                    "pretrain,long-context,sft,rl); the time of the others goes to these")  # fmt: skip
    p.set_defaults(func=cmd_speedrun)

    p = sub.add_parser("posttrain", help="RL teachers, RL student, MOPD and evaluation from an SFT model (resumable)")
    p.add_argument("--init-from", help="the SFT model (model or run directory); default: the speedrun's pretraining, "
                                       "long context and SFT first, in half the budget")  # fmt: skip
    p.add_argument("--minutes", type=positive_float, default=60.0, help="time budget of the whole command")
    p.add_argument("--out", help="run directory (default: a new posttrain-<time> folder); again to resume")
    p.add_argument("--size", default="tiny", help="recipes/SIZE-rl.yaml, SIZE-rl-teacher-*.yaml, SIZE-distill.yaml")
    p.add_argument("--recipes", help="the recipes directory (default: the repository's recipes/)")
    p.add_argument("--samples", type=positive_int, help="held-out tasks per domain in the evaluations (default 200)")
    p.add_argument("--no-compare", action="store_true", help="skip continuing RL for MOPD's student-sampled tokens")
    p.add_argument("--seed", type=int, default=0, help="train.seed of every stage (prompt order, sampling)")
    p.add_argument("--budgets", type=reasoning_budgets, help="reasoning budgets the MOPD student is evaluated at, "
                   "thinking tokens per turn (default 0,4,8,16,32,64,none; none: no budget)")  # fmt: skip
    p.add_argument("--budget-domains", help="the two (or more) domains of the budget sweep, comma-separated "
                   "(default: calculator,retrieval where the recipes cover them)")  # fmt: skip
    p.add_argument("--no-budget-sweep", action="store_true", help="skip the MOPD student's reasoning-budget sweep")
    p.add_argument("overrides", nargs="*", help="recipe keys for every stage, e.g. rl.max_new_tokens=96 (distill.* "
                                                "for MOPD only)")  # fmt: skip
    p.set_defaults(func=cmd_posttrain)

    p = sub.add_parser(
        "finetune",
        help="SFT of a Hugging Face MoE model on chat messages (JSONL); an alias of sft with model.source=transformers",
    )
    p.add_argument("--model", required=True, help="a Hugging Face model directory (with a chat-template tokenizer)")
    p.add_argument("--data", required=True, help='JSONL, one {"messages": [{"role", "content"}, ...]} per line')
    p.add_argument("--out", default="runs/finetune", help="run directory (log.jsonl, checkpoints/, final/)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per packed sample")
    p.add_argument("--batch-size", type=int, default=8, help="packed samples per optimizer step")
    p.add_argument("--micro-batch-size", type=positive_int, default=1, help="samples per forward/backward")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--steps", type=positive_int, help="optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-5, or 1e-4 with --lora)")
    p.add_argument("--warmup-steps", type=nonnegative_int, default=0)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32", "bfloat16", "float32"))
    p.add_argument("--lora", action="store_true", help="train LoRA adapters (linears and experts) instead")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=32.0)
    p.add_argument("--lora-targets", help="comma-separated module names (default: all linear layers)")
    p.add_argument("--no-lora-experts", action="store_true", help="no LoRA on the 3D expert weights")
    p.add_argument("--drop-long", action="store_true", help="leave out (and count) conversations over --seq-len")
    p.add_argument("--save-every", type=positive_int, default=100, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ep", type=positive_int, default=1, help="expert-parallel degree (under torchrun)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("eval", help="evaluate a checkpoint: RULER long-context tasks, perplexity, task domains")
    eval_sub = p.add_subparsers(dest="eval_command", required=True)
    e = eval_sub.add_parser("ruler", help="RULER's 13 synthetic long-context tasks at the given lengths (resumable)")
    e.add_argument("checkpoint", help="a Hugging Face model directory with its tokenizer")
    e.add_argument("--lengths", required=True, help="prompt + answer lengths in tokens, e.g. 4k,8k,16k or 4096")
    e.add_argument("--samples", type=int, default=50, help="samples per task and length (RULER reports 500)")
    e.add_argument("--tasks", help="comma-separated subset of the 13 tasks (default: all)")
    e.add_argument("--out", help="results folder; rerun with the same one to resume (default: eval/ruler-<name>)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--haystack", nargs="+", metavar="FILE", help="prose documents for the essay haystacks "
                   "(text/.jsonl/.parquet; default: the Python standard library's docstrings)")  # fmt: skip
    e.add_argument("--tokenizer", help="tokenizer directory, if not in the checkpoint")
    e.add_argument("--device", type=device, help="default: cuda if available, else cpu")
    e.add_argument("--dtype", choices=DTYPE_NAMES, help="default: bfloat16 on GPU, else fp32")
    e.set_defaults(func=cmd_eval_ruler)
    e = eval_sub.add_parser("ppl", help="perplexity and bits per byte on documents or a prepared token directory")
    e.add_argument("checkpoint", help="a Hugging Face model directory with its tokenizer")
    e.add_argument("data", nargs="+", metavar="DATA", help="text/.jsonl/.parquet files or folders, or a folder "
                   "written by `hybridmoe prepare`")  # fmt: skip
    e.add_argument("--seq-len", type=int, default=2048, help="tokens per window")
    e.add_argument("--max-tokens", type=int, help="evaluate at most this many tokens (default: all)")
    e.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    e.add_argument("--field", default="text", help="the text field of .jsonl records / column of .parquet files")
    e.add_argument("--split", default="all", choices=("all", "train", "val"), help="documents of a prepared folder")
    e.add_argument("--no-verify", dest="verify", action="store_false",
                   help="open a prepared folder without checking its shards' sha256 against the manifest")  # fmt: skip
    e.add_argument("--out", help="JSON result file (default: eval/ppl-<checkpoint>-<data>-<seq-len>.json)")
    e.add_argument("--device", type=device, help="default: cuda if available, else cpu")
    e.add_argument("--dtype", choices=DTYPE_NAMES, help="default: bfloat16 on GPU, else fp32")
    e.set_defaults(func=cmd_eval_ppl)

    e = eval_sub.add_parser("tasks", help="accuracy on held-out tasks of the verifiable domains (reasoning on/off)")
    e.add_argument("checkpoint", help="a Hugging Face model directory with its tokenizer")
    e.add_argument("--domains", help="comma-separated task domains (default: all)")
    e.add_argument("--samples", type=int, default=20, help="tasks per domain")
    e.add_argument("--difficulty", type=int, default=1, help="task difficulty (1 = easiest)")
    e.add_argument("--split", default="heldout", help="seed split the tasks come from")
    e.add_argument("--offset", type=int, default=0, help="skip this many seeds of the split (a fresh slice)")
    e.add_argument("--reasoning", choices=("on", "off", "both"), default="both", help="thinking block on, off, or "
                   "both measured separately")  # fmt: skip
    e.add_argument("--reasoning-budget", type=int, help="force </think> after this many thinking tokens per turn")
    e.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    e.add_argument("--top-p", type=float, default=1.0)
    e.add_argument("--seed", type=int, default=0, help="sampling seed (each request's seed derives from it)")
    e.add_argument("--pass-k", type=int, default=1, help="samples per task; reports pass@k for k <= K (needs "
                   "--temperature > 0 when K > 1)")  # fmt: skip
    e.add_argument("--max-new-tokens", type=int, default=512, help="tokens per assistant turn at most")
    e.add_argument("--max-tool-rounds", type=int, default=3, help="tool call rounds per answer at most")
    e.add_argument("--overlap-seeds", type=int, default=1000, help="count evaluated prompts that also come from "
                   "this many training seeds")  # fmt: skip
    e.add_argument("--max-num-seqs", type=int, default=16, help="requests decoded together (engine slots)")
    e.add_argument(
        "--max-model-len", type=positive_int, help="prompt + output tokens per request (default: the config's)"
    )
    e.add_argument("--out", help="results folder (default: eval/tasks-<checkpoint name>)")
    e.add_argument("--tokenizer", help="tokenizer directory, if not in the checkpoint")
    e.add_argument("--device", type=device, help="default: cuda if available, else cpu")
    e.add_argument("--dtype", choices=DTYPE_NAMES, help="default: bfloat16 on GPU, else fp32")
    e.set_defaults(func=cmd_eval_tasks)

    e = eval_sub.add_parser("envs", help="greedy pass@1 on held-out episodes of the RL environments (agent loop)")
    e.add_argument("checkpoint", help="a Hugging Face model directory with its tokenizer")
    e.add_argument("--envs", help="comma-separated environments (default: all)")
    e.add_argument("--samples", type=int, default=20, help="episodes per environment")
    e.add_argument("--difficulty", type=int, default=1, help="task difficulty (1 = easiest)")
    e.add_argument("--offset", type=int, default=0, help="skip this many seeds of the split (a fresh slice)")
    e.add_argument("--split", choices=("heldout", "train"), default="heldout",
                   help="the seeds' split; train with --offset 1000000: the RL stage's prompt pools")  # fmt: skip
    e.add_argument("--reasoning", choices=("on", "off", "both"), default="both", help="thinking block on, off, or "
                   "both measured separately")  # fmt: skip
    e.add_argument("--max-new-tokens", type=int, default=512, help="generated tokens per episode (all turns)")
    e.add_argument("--max-num-seqs", type=int, default=16, help="requests decoded together (engine slots)")
    e.add_argument(
        "--max-model-len", type=positive_int, help="prompt + output tokens per request (default: the config's)"
    )
    e.add_argument("--out", help="results folder (default: eval/envs-<checkpoint name>)")
    e.add_argument("--tokenizer", help="tokenizer directory, if not in the checkpoint")
    e.add_argument("--device", type=device, help="default: cuda if available, else cpu")
    e.add_argument("--dtype", choices=DTYPE_NAMES, help="default: bfloat16 on GPU, else fp32")
    e.set_defaults(func=cmd_eval_envs)

    def add_model_args(p, max_tokens: int):
        p.add_argument("checkpoint", help="a Hugging Face model directory with its tokenizer")
        p.add_argument("--tokenizer", help="tokenizer directory, if not in the checkpoint")
        p.add_argument(
            "--max-model-len", type=positive_int, help="prompt + output tokens per request (default: the config's)"
        )
        p.add_argument("--device", type=device, help="default: cuda if available, else cpu")
        p.add_argument("--dtype", choices=DTYPE_NAMES, help="default: bfloat16 on GPU, else fp32")
        p.add_argument("--reasoning-budget", type=int, help="force </think> after this many thinking tokens")
        p.add_argument(
            "--decode-mode", choices=("eager", "static", "graphs", "compile"),
            help="the engine's decode step (default: graphs on GPU, else eager; static / compile: static shapes, "
            "eager / through torch.compile)",
        )  # fmt: skip
        if max_tokens:
            p.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate at most")
            p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
            p.add_argument("--top-p", type=float, default=1.0)
            p.add_argument("--seed", type=int, help="sampling seed (default: the engine's generator)")
            p.add_argument("--no-reasoning", action="store_true", help="answer without a thinking block")

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, completions, models, health, metrics)")
    add_model_args(p, max_tokens=0)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    p.add_argument("--port", type=port, default=8000)
    p.add_argument("--served-model-name", help="the model id clients send (default: the checkpoint folder name)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="requests decoded together (engine slots)")
    p.add_argument("--grace", type=nonnegative_float, default=30.0, help="seconds in-flight requests get on shutdown")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $HYBRIDMOE_API_KEY, else none)")
    p.add_argument(
        "--allowed-host",
        action="append",
        default=[],
        metavar="NAME",
        help="a Host name the server answers to besides the bound address (repeatable; * for any)",
    )
    p.add_argument(
        "--weight-version",
        type=nonnegative_int,
        default=0,
        help="the version the weights are reported as (POST /v1/weights raises it)",
    )
    limits = p.add_argument_group("limits (each refused with a clear error)")
    limits.add_argument("--max-body-mb", type=float, default=8.0, help="request body size (413 beyond)")
    limits.add_argument("--max-prompt-chars", type=int, default=1_000_000, help="prompt characters before tokenizing")
    limits.add_argument("--max-prompts", type=int, default=64, help="choices per request (prompts times n)")
    limits.add_argument("--max-stop", type=int, default=4, help="stop strings per request (OpenAI's limit: 4)")
    limits.add_argument("--max-queue", type=int, default=256, help="requests waiting for a slot (503 beyond)")
    limits.add_argument(
        "--request-timeout", type=float, default=600.0, help="seconds a request may run (504 beyond; 0: no limit)"
    )
    limits.add_argument("--header-timeout", type=float, default=10.0, help="seconds to send the request head")
    limits.add_argument("--body-timeout", type=float, default=30.0, help="seconds to send the request body (408)")
    limits.add_argument("--max-connections", type=int, default=512, help="open connections (503 beyond)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("generate", help="stream the continuation of one prompt (or a chat reply with --chat)")
    add_model_args(p, max_tokens=256)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message with the chat template")
    p.add_argument(
        "--speculative",
        type=positive_int,
        metavar="K",
        help="MTP speculative decoding, K drafts per step (not streamed)",
    )
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat in the terminal, streamed (/exit quits, /think toggles reasoning)")
    add_model_args(p, max_tokens=1024)
    p.add_argument("--system", help="a system message")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("tasks", help="verifiable task domains: write SFT conversations, show a task")
    tasks_sub = p.add_subparsers(dest="tasks_command", required=True)
    t = tasks_sub.add_parser("write", help="write SFT conversations (prompt + worked solution) as JSONL")
    t.add_argument("out", help="output .jsonl file (written atomically)")
    t.add_argument("--domains", default="all", help="comma-separated domain names (default: all)")
    t.add_argument("--per-domain", type=int, required=True, help="conversations per domain")
    t.add_argument("--split", default="train", choices=("train", "heldout"), help="the seed range to draw from")
    t.add_argument("--difficulty", type=int, default=1, help="1 (easiest) to 3")
    t.add_argument("--offset", type=int, default=0, help="skip this many seeds of the split (a fresh slice)")
    t.add_argument(
        "--recovery-share", type=float, default=0.0,
        help="of terminal's one-step tasks, the share written as a recovery from a failed call (0 to 1)",
    )  # fmt: skip
    t.set_defaults(func=cmd_tasks_write)
    t = tasks_sub.add_parser("show", help="print one task, its reference solution and its answer")
    t.add_argument("domain")
    t.add_argument("--seed", type=int, default=0, help="train seeds start at 0, held-out ones at 1000000000")
    t.add_argument("--difficulty", type=int, default=1, help="1 (easiest) to 3")
    t.add_argument("--json", action="store_true", help="print the task as JSON")
    t.set_defaults(func=cmd_tasks_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    # Bad input or a path that cannot be used as given (e.g. --out naming a file): the message names it, a
    # traceback would bury it.
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
