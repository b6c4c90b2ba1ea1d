"""The sandbox's escapes and abuses (issue 14): every abuse of `hybridmoe.envs.abuse` (fork bomb, memory bomb,
infinite loop, huge output, writing outside the directory, reading the host's environment or another process's
/proc, opening a socket, sleeping past the deadline, killing the parent, leaving a background process), each as
model-written Python (`run_python`) and as a shell command (`ShellSession`), with the host checked after each.

    python benchmarks/bench_sandbox.py                  # about 15 s on 2 cores
Results: benchmarks/results/sandbox.json (--out): the machine, the isolation layers this kernel allowed, and per
abuse and kind: contained yes/no, how (timeout, limit, refused, isolated, cleaned), seconds, whether this kernel is
expected to contain it, and what gave it away or the run's last error line. Prints a table and the count tried and
contained.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from dataclasses import asdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from hybridmoe.envs.abuse import ABUSES, KINDS, try_abuse  # noqa: E402
from hybridmoe.envs.sandbox import isolation  # noqa: E402
from hybridmoe.utils import atomic_write_text  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "sandbox.json"))
    p.add_argument("--timeout", type=float, default=1.0, help="wall-clock limit of each run, seconds")
    args = p.parse_args()
    iso = isolation()
    outcomes = [try_abuse(abuse, kind, timeout_s=args.timeout) for abuse in ABUSES for kind in KINDS]
    contained = sum(o.contained for o in outcomes)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "root": os.geteuid() == 0},
        "isolation": iso.summary(),
        "timeout_s": args.timeout,
        "tried": len(outcomes),
        "contained": contained,
        "abuses": [asdict(o) for o in outcomes],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(f"isolation: {iso.summary()}")
    print("| abuse | kind | contained | how | seconds | detail |")
    print("|---|---|---|---|---:|---|")
    for o in outcomes:
        print(f"| {o.name} | {o.kind} | {'yes' if o.contained else 'NO'} | {o.how} | {o.seconds:.2f} | {o.detail} |")
    print(f"tried {len(outcomes)}, contained {contained}")
    return 0 if contained == len(outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(main())
