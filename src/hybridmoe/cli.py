"""`hybridmoe <command>`: parse arguments, call one stage function, print its result. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys


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


def build_parser() -> argparse.ArgumentParser:
    from .presets import PRESETS

    parser = argparse.ArgumentParser(prog="hybridmoe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("params", help="total and active parameter counts of a preset or config (built on meta)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--config", help="a config.json or model directory instead of a preset")
    p.add_argument("--json", action="store_true", help='print one line {"total": N, "active": N}')
    p.add_argument("overrides", nargs="*", help="config fields as key=value")
    p.set_defaults(func=cmd_params)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
