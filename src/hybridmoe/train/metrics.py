"""Where the numbers of a run go: a JSONL file (one record per step or evaluation), TensorBoard when installed,
and the progress bar. Every stage logs through this, so loss, tokens/s, MFU and expert imbalance mean the same
thing everywhere."""

from __future__ import annotations

import json
import math
import os

from ..utils import atomic_write_text


class MetricsLog:
    def __init__(self, out_dir: str, tensorboard: bool = True, resume_step: int | None = None):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "log.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            # Records written after the checkpoint we resume from belong to a run that did not survive.
            with open(self.path) as fh:
                kept = [line for line in fh if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(kept))
        elif resume_step is None and os.path.exists(self.path):
            os.replace(self.path, self.path + ".old")
        self.file = open(self.path, "a")  # noqa: SIM115 (kept open for the run)
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))
            except ImportError:
                self.tb = None

    def log(self, record: dict) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.file.write(json.dumps(clean) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = record.get("step", 0)
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and v is not None:
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_log(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]
