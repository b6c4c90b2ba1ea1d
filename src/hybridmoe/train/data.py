"""The data side of a training stage: one packed loader per sequence length, and which one each step uses.

A pretraining stage has one stream (its curriculum phases at `data.seq_len`). A long-context stage mixes lengths
(the reference Ultra recipe: 92% of steps at full length, 8% short): `data.seq_mix` gives each length its batch
size, its share of the steps and optionally its own data. Step s uses the length whose realized share of the
steps so far lags its target most, so the mix is exact at every point and needs no state of its own.
"""

from __future__ import annotations

from ..data.loader import Phase, PretrainLoader
from .config import Recipe


class Stream:
    def __init__(self, loader: PretrainLoader, seq_len: int, batch_size: int, grad_accum: int):
        self.loader, self.seq_len = loader, seq_len
        self.tokens_per_step = seq_len * batch_size * grad_accum

    def next_batch(self):
        return next(self.loader)

    @property
    def phase(self):
        return self.loader.phase


class Streams:
    def __init__(self, recipe: Recipe, model_config):
        d, t = recipe.data, recipe.train
        entries = d.seq_mix or [None]
        fractions = [e.fraction if e is not None else 1.0 for e in entries]
        self.schedule = _interleave(fractions, t.steps)
        self.streams = []
        for i, e in enumerate(entries):
            seq_len = e.seq_len if e is not None else d.seq_len
            batch = e.batch_size if e is not None else d.batch_size
            phases = (e.phases if e is not None and e.phases else None) or d.phases
            steps = self.schedule.count(i)
            loader = PretrainLoader(
                [Phase.from_dict({"datasets": p.datasets, "until": p.until}) for p in phases],
                seq_len=seq_len,
                batch_size=batch,
                seed=t.seed,
                total_tokens=max(1, steps) * d.grad_accum * batch * seq_len,
                val_fraction=d.val_fraction,
                verify=d.verify,
            )
            if loader.datasets[0].vocab_size > model_config.vocab_size:
                raise ValueError(
                    f"the data was tokenized with a vocabulary of {loader.datasets[0].vocab_size} but the model has "
                    f"vocab_size={model_config.vocab_size}; set model.overrides.vocab_size or use another tokenizer"
                )
            self.streams.append(Stream(loader, seq_len, batch, d.grad_accum))

    def for_step(self, step: int) -> Stream:
        return self.streams[self.schedule[min(step, len(self.schedule) - 1)]]

    def tokens_seen(self) -> int:
        return sum(s.loader.tokens_served for s in self.streams)

    def validation_batches(self, max_batches: int) -> list:
        s = self.streams[0]
        return list(s.loader.val_batches(max_batches=max_batches))

    def state_dict(self) -> dict:
        return {"streams": [s.loader.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["streams"]) != len(self.streams):
            raise ValueError("the checkpoint's data streams do not match the recipe's data.seq_mix")
        for s, st in zip(self.streams, state["streams"]):
            s.loader.load_state_dict(st)


def _interleave(fractions: list[float], steps: int) -> list[int]:
    """Step -> stream index, each stream taking its fraction of the steps, spread evenly."""
    counts = [0] * len(fractions)
    out = []
    for s in range(steps):
        lag = [f * (s + 1) - c for f, c in zip(fractions, counts)]
        i = max(range(len(fractions)), key=lambda j: lag[j])
        counts[i] += 1
        out.append(i)
    return out
