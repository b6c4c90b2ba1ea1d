"""Where the numbers of a run go: a JSONL file (one record per step or evaluation), TensorBoard when installed,
and the progress bar. Every stage logs through this, so loss, tokens/s, MFU and expert imbalance mean the same
thing everywhere."""

from __future__ import annotations

import json
import logging
import math
import os

from ..utils import atomic_write_text

log = logging.getLogger(__name__)


class MetricsLog:
    def __init__(self, out_dir: str, tensorboard: bool = True, resume_step: int | None = None):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, "log.jsonl")
        if resume_step is not None and os.path.exists(self.path):
            # Records written after the checkpoint we resume from belong to a run that did not survive.
            kept = [line for line, record in _read_lines(self.path) if record.get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
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
    """The records of a log.jsonl. An incomplete last line (the run was killed while writing it) is skipped with a
    warning; a damaged line anywhere else is a ValueError naming the file and the line."""
    return [record for _, record in _read_lines(path)]


def _read_lines(path: str) -> list[tuple[str, dict]]:
    """(line, record) for each non-empty line of a JSONL log."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        lines = [(n, line.strip()) for n, line in enumerate(fh, 1) if line.strip()]
    out = []
    for i, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except ValueError as e:
            record, error = None, str(e)
        else:
            error = None if isinstance(record, dict) else f"a JSON {type(record).__name__}, not an object"
        if error is None:
            out.append((line, record))
        elif i == len(lines) - 1:
            log.warning("%s, line %d: incomplete record (a run killed while writing it), skipped", path, n)
        else:
            raise ValueError(
                f"{path}, line {n}: not a JSON record ({error}); the log is damaged there: fix or delete that line"
            )
    return out
