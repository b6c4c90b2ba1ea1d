"""Reinforcement learning from verifiable rewards with GRPO (`hybridmoe rl RECIPE`): the stage loop.

The Nemotron 3 RLVR recipe (the Nemotron 3 Super technical report, NVIDIA, 2025; NeMo-RL's GRPO): each prompt of an
environment is sampled G times, the rewards are turned into advantages against the group, and the policy takes one
optimizer step on the clipped, importance-weighted policy-gradient loss (`train.grpo`) per batch. Per step:
  1. the step's trajectories from the rollout source (`train.rollout`: the in-process engine, or `hybridmoe serve`
     workers asynchronously), each at most rl.max_staleness weight versions old (checked here);
  2. advantages per group; the trajectories packed into rows (several per row with document_ids, so that nothing
     attends or carries Mamba state across them; or one per row);
  3. per micro-batch, the trainer's log-probability of every generated token (the model's forward, then the LM head
     on those positions only, in chunks: `grpo.linear_token_logprobs`), the importance weights against the rollout
     engine's log-probabilities (both of softmax(logits / rl.temperature), the policy that sampled: the engine's
     `processed_logprobs`), the loss over the GLOBAL batch's loss-token count, backward;
  4. after the session's optimizer step, the new weights are published to the rollout source (version step + 1).
Prompts come from `grpo.PromptIterator` over per-environment pools of training seeds, with the prompts the starting
model always solves (and, with rl.pass_rate_filter.drop_unsolved, those it never solves) dropped up front
(`rl.pass_rate_filter`, measured once and kept in train.out_dir/pass_rates.json) and each batch holding a fixed share
of every environment. With rl.freeze_router the routers' weights get no gradient and their selection biases no
update. Everything else (torchrun, resume, stop, clip and step, logging, checkpoints) is the session's
(`train.session`). Under torchrun rank 0 alone talks to the rollout source: it broadcasts each batch's trajectories,
every rank trains on its rows, and the full weights are gathered for publishing.

Log keys beyond every stage's: pg, kl, reward, reward_<env>, accuracy (the fraction of trajectories with the full
reward), staleness_max / staleness_mean, trajectories, loss_tokens, zero_variance_groups (groups that contribute
nothing), filtered_prompts (dropped up front), truncated (trajectories cut by a limit), clip_fraction, the
rollout-vs-trainer mismatch (mismatch_mean and mismatch_max of |logp_trainer - logp_rollout|, mismatch_kl, the k3
estimate of KL(rollout || trainer) per token) and the importance correction (tis_clipped: fraction of tokens TIS
truncated; masked_sequences), rollout_s (seconds spent getting the batch: generating it with rl.rollout=sync, waiting
for it with async).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist

from .. import distributed
from ..accounting import flops_per_token
from ..envs.base import Trajectory
from ..serve.sampling import SamplingParams
from ..tasks.base import split_seeds
from ..utils import atomic_write_text
from .balance import balance_experts, moe_layers
from .config import RLRecipe
from .grpo import (
    PromptIterator,
    group_advantages,
    importance_weights,
    linear_token_logprobs,
    pass_rate_filter,
    policy_loss,
)
from .model import autocast, build_model, resolve_init
from .session import Stage, StepOutput, run


def rl(recipe: RLRecipe, resume: bool = False, stop_after: int | None = None, peak_gflops: float | None = None):
    """Run (or resume) a GRPO recipe; the summary of `session.run` (plus `pools` and `filtered`)."""
    return run(recipe, RLStage, resume=resume, stop_after=stop_after, peak_gflops=peak_gflops)


class RLStage(Stage):
    def __init__(self, recipe: RLRecipe, ckpt: str | None, par):
        from ..data.tokenizer import load_tokenizer
        from ..envs.agent import make_envs

        self.recipe, self.par = recipe, par
        if par is not None and par.tp > 1:  # its batches split over all ranks; tensor parallelism is pretraining's
            raise ValueError(f"parallel.tp={par.tp}: the RL stage runs with parallel.tp=1 so far")
        if par is not None and par.cp > 1:
            raise ValueError(f"parallel.cp={par.cp}: the RL stage runs with parallel.cp=1 so far")
        self.world = par.world_size if par is not None else 1
        self.main = par is None or par.is_main
        r, e = recipe.rl, recipe.envs
        self.tokenizer = recipe.model.tokenizer or resolve_init(recipe.model.init_from)
        self.tok = load_tokenizer(self.tokenizer)
        self.model = self._load_model(ckpt)
        if len(self.tok) > self.model.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(self.tok)} tokens but the model has "
                             f"vocab_size={self.model.config.vocab_size}")  # fmt: skip
        self.consolidate = recipe.parallel.consolidate
        self.steps = recipe.train.steps
        self.envs = make_envs(sorted(e.ratios))
        unknown = sorted(set(e.ratios) - set(self.envs))
        if unknown:
            raise ValueError(f"envs.ratios names unknown environment(s) {unknown}; known: {sorted(self.envs)}")
        # The rollout logprobs are those of the distribution sampled from (logits / rl.temperature), as the trainer's
        self.params = SamplingParams(temperature=r.temperature, max_tokens=r.max_new_tokens, logprobs=0,
                                     logprobs_mode="processed_logprobs")  # fmt: skip
        pools = {name: list(split_seeds("train", e.pool, e.offset)) for name in sorted(e.ratios)}
        self.filtered = {name: 0 for name in pools}
        if r.pass_rate_filter.samples:
            f = r.pass_rate_filter
            pools, self.filtered = pass_rate_filter(pools, self._pass_rates(pools), f.drop_at, f.drop_unsolved)
            if self.main:
                left = {k: len(v) for k, v in pools.items()}
                print(f"pass-rate filter: dropped {self.filtered} prompts solved at a rate >= {f.drop_at}"
                      f"{' or never' if f.drop_unsolved else ''}; left {left}", flush=True)  # fmt: skip
        self.pools = {name: len(seeds) for name, seeds in pools.items()}
        self.prompts = PromptIterator(pools, e.ratios, r.prompts_per_step, seed=recipe.train.seed)
        self.reference = None
        if r.kl_coef > 0:  # the starting weights: model.init_from, or the preset's init from the run's seed
            with torch.random.fork_rng():
                torch.manual_seed(recipe.train.seed)
                self.reference = self._load_model(None, frozen=True)
        self.rollouts = None  # made at the first step, from the weights then (a resumed run's are loaded by then)
        self._unsharded = None  # torchrun, rank 0: the full weights for publishing
        self.version = 0
        self.trained_prompts = 0  # the prompts whose groups the finished steps trained on

    # ------------------------------------------------------------------ model
    def _load_model(self, ckpt: str | None, frozen: bool = False):
        """The native model (from the checkpoint being resumed, else model.init_from), the routers frozen when
        asked (before sharding, so that FSDP sees which parameters train), sharded under torchrun. frozen: the
        reference model for the KL term (the starting weights, no gradients)."""
        model = build_model(self.recipe, ckpt)
        if frozen:
            model.requires_grad_(False)
        elif self.recipe.rl.freeze_router:
            for layer in moe_layers(model):
                layer.gate.weight.requires_grad_(False)
        if self.par is not None:
            if self.par.pp > 1:
                raise ValueError("parallel.pp > 1: pipeline parallelism runs pretraining only; set parallel.pp=1")
            model.to(self.par.device)
            distributed.parallelize(model, self.par, self.recipe.parallel.reshard_after_forward)
        return model.eval() if frozen else model.train()

    def _full_model(self):
        """The trainer's weights as an unsharded model: the model itself in one process; under torchrun (a
        collective) a copy on rank 0 that the gathered full state dict is loaded into (None on other ranks)."""
        if self.par is None:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from ..modeling import HybridMoEForCausalLM

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.main:
            return None
        if self._unsharded is None:
            p = next(self.model.parameters())
            self._unsharded = HybridMoEForCausalLM(self.model.config, device="meta").to_empty(device=self.par.device)
            self._unsharded.to(p.dtype)
        self._unsharded.load_state_dict(full)
        return self._unsharded

    # ------------------------------------------------------------------ rollouts
    def _make_rollouts(self, model, version: int):
        r, e = self.recipe.rl, self.recipe.envs
        common = dict(
            group_size=r.group_size, prompts_per_step=r.prompts_per_step, params=self.params,
            difficulty=e.difficulty, reasoning=e.reasoning, max_new_tokens=r.max_new_tokens, model=model,
            max_model_len=r.max_model_len, seed=self.recipe.train.seed,
        )  # fmt: skip
        if r.rollout == "async":
            from .async_rollout import AsyncRollouts

            # The workers start from the trainer's weights now (a resumed run's too), saved as a model directory.
            start = os.path.join(self.recipe.train.out_dir, "rollout-start")
            tmp = tempfile.mkdtemp(prefix=".rollout-start.", dir=self.recipe.train.out_dir)
            model.save_pretrained(tmp)
            self.tok.save_pretrained(tmp)
            if os.path.exists(start):
                shutil.rmtree(start)
            os.replace(tmp, start)
            common.pop("model")
            common.pop("seed")
            return AsyncRollouts(self.envs, self.prompts, self.tok, **common, checkpoint=start,
                                 initial_version=version, max_staleness=r.max_staleness, workers=r.workers,
                                 max_num_seqs=r.max_num_seqs, distributed=False)  # fmt: skip
        from .rollout import SyncRollouts

        return SyncRollouts(self.envs, self.prompts, self.tok, **common, max_num_seqs=r.max_num_seqs)

    def _batch(self, version: int) -> list[Trajectory]:
        """The step's trajectories (rank 0 asks the source; under torchrun it sends them to every rank)."""
        if self.rollouts is None:
            self._batch_source(version)
        batch = self.rollouts.next_batch(version) if self.main else None
        if self.par is not None:
            box = [batch]
            dist.broadcast_object_list(box, src=0)
            batch = box[0]
        return batch

    def _batch_source(self, version: int) -> None:
        """Start the rollout source (rank 0) with the trainer's weights at `version`."""
        model = self._full_model()  # collective under torchrun
        self.rollouts = False  # ranks other than 0 have none
        if self.main:
            self.prompts.load_state_dict({"position": self.trained_prompts})
            self.rollouts = self._make_rollouts(model, version)
            if self.recipe.rl.rollout == "sync":
                self.rollouts.publish(model, version)

    def _pass_rates(self, pools: dict[str, list[int]]) -> dict[tuple[str, int], float]:
        """The starting model's pass rate of every pool prompt, measured once (rank 0) and kept in
        train.out_dir/pass_rates.json, which a resumed run reads back."""
        r, e = self.recipe.rl, self.recipe.envs
        path = os.path.join(self.recipe.train.out_dir, "pass_rates.json")
        key = {
            "init_from": self.recipe.model.init_from, "envs": sorted(pools), "difficulty": e.difficulty,
            "reasoning": e.reasoning, "pool": e.pool, "offset": e.offset, "samples": r.pass_rate_filter.samples,
            "temperature": r.temperature, "max_new_tokens": r.max_new_tokens,
        }  # fmt: skip
        if not os.path.exists(path):
            model = self._full_model()  # collective under torchrun
            if self.main:
                from ..envs.agent import EngineGenerator
                from .rollout import engine_copy, measure_pass_rates

                engine = engine_copy(model, self.tok, max_num_seqs=r.max_num_seqs, max_model_len=r.max_model_len,
                                     seed=self.recipe.train.seed)  # fmt: skip
                prompts = [(name, seed) for name, seeds in pools.items() for seed in seeds]
                rates = measure_pass_rates(
                    self.envs, prompts, EngineGenerator(engine), self.tok, samples=r.pass_rate_filter.samples,
                    params=self.params, difficulty=e.difficulty, reasoning=e.reasoning,
                    max_new_tokens=r.max_new_tokens,
                )  # fmt: skip
                record = {"settings": key, "rates": [[name, seed, rate] for (name, seed), rate in rates.items()]}
                atomic_write_text(path, json.dumps(record))
            if self.par is not None:
                self.par.barrier()
        with open(path) as fh:
            record = json.load(fh)
        if record.get("settings") != key:
            raise ValueError(
                f"{path} holds pass rates measured with other settings ({record.get('settings')}); this run has "
                f"{key}: delete the file to measure again, or use another train.out_dir"
            )
        return {(name, int(seed)): float(rate) for name, seed, rate in record["rates"]}

    # ------------------------------------------------------------------ the step
    def train_step(self, step: int) -> StepOutput:
        r = self.recipe.rl
        self.version = step  # the trainer's weights: after `step` optimizer steps
        if self.streams and r.rollout == "async" and r.stream_groups and self.par is None:
            return self._streamed_step(step)
        t0 = time.perf_counter()
        batch = self._batch(version=step)  # sync: generated now; async: waited for
        rollout_s = time.perf_counter() - t0
        stale = [step - t.weight_version for t in batch]
        if not batch or max(stale) > r.max_staleness or min(stale) < 0:
            raise RuntimeError(
                f"step {step}: the rollout source gave {len(batch)} trajectories with staleness {sorted(set(stale))}; "
                f"each must be between 0 and rl.max_staleness={r.max_staleness}"
            )
        rows = pack(batch, self._advantages(batch), r.seq_len)
        # every rank the same number of rows, hence of forwards (FSDP's gathers pair up across ranks)
        rows += [_empty_row()] * (-len(rows) % self.world)
        per = len(rows) // self.world
        rank = self.par.rank if self.par is not None else 0
        mine = rows[rank * per : (rank + 1) * per]
        self._prepare_rows(batch, mine)
        micro = [collate(mine[i : i + r.micro_batch_size]) for i in range(0, len(mine), r.micro_batch_size)]
        local_tokens = sum(int(m["mask"].sum()) for m in micro)
        num_tokens = self.par.sum([local_tokens])[0] if self.par is not None else local_tokens
        sums = self._forward_backward(micro, max(1, num_tokens))
        extra = self._log_keys(batch, stale, sums, num_tokens)
        extra["rollout_s"] = rollout_s
        self.trained_prompts += len({t.group for t in batch})
        losses = {k: sums[k] * self.world for k in ("loss", "pg", "kl")}  # the session averages over ranks
        tokens = sum(len(row["input_ids"]) for row in rows)
        mean_len = max(2, round(tokens / max(1, len(rows))))
        return StepOutput(losses, tokens, flops_per_token(self.model.config, mean_len), extra)

    streams = True  # whether train_step may take an asynchronous batch in parts (`_streamed_step`)

    def _streamed_step(self, step: int) -> StepOutput:
        """`train_step` on a batch taken in parts as its groups finish (`AsyncRollouts.stream_batch`): each part is
        packed, and its forward and backward run, while the rest generates. The loss is a sum over the batch's
        tokens divided by their number, which is known only at the end: each part's backward takes the sum, and the
        gradients are divided by the count once all parts are in (the same gradient up to rounding; the advantages
        are per group, so a part's are the batch's)."""
        r = self.recipe.rl
        if self.rollouts is None:
            self._batch_source(step)
        batch, rows_tokens, num_rows, num_tokens, waited = [], 0, 0, 0, 0.0
        sums: dict[str, float] = {}
        parts = self.rollouts.stream_batch(step)
        while True:
            t0 = time.perf_counter()
            part = next(parts, None)
            waited += time.perf_counter() - t0
            if part is None:
                break
            stale = [step - t.weight_version for t in part]
            if max(stale) > r.max_staleness or min(stale) < 0:
                raise RuntimeError(f"step {step}: the rollout source gave trajectories with staleness "
                                   f"{sorted(set(stale))}; each must be between 0 and rl.max_staleness="
                                   f"{r.max_staleness}")  # fmt: skip
            rows = pack(part, self._advantages(part), r.seq_len)
            self._prepare_rows(part, rows)
            micro = [collate(rows[i : i + r.micro_batch_size]) for i in range(0, len(rows), r.micro_batch_size)]
            num_tokens += sum(int(m["mask"].sum()) for m in micro)
            part_sums = self._forward_backward(micro, 1)  # sums over the tokens, divided below
            sums = {k: max(sums.get(k, 0.0), v) if k == "abs_diff_max" else sums.get(k, 0.0) + v
                    for k, v in part_sums.items()}  # fmt: skip
            batch += part
            rows_tokens += sum(len(row["input_ids"]) for row in rows)
            num_rows += len(rows)
        if not batch:
            raise StopIteration("the rollout prompts ran out")
        scale = 1 / max(1, num_tokens)
        for p in self.model.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)
        for k in ("loss", "pg", "kl"):
            sums[k] *= scale
        stale = [step - t.weight_version for t in batch]
        extra = self._log_keys(batch, stale, sums, num_tokens)
        extra["rollout_s"] = waited
        self.trained_prompts += len({t.group for t in batch})
        mean_len = max(2, round(rows_tokens / max(1, num_rows)))
        losses = {k: sums[k] for k in ("loss", "pg", "kl")}
        return StepOutput(losses, rows_tokens, flops_per_token(self.model.config, mean_len), extra)

    # ------------------------------------------------------------------ advantages (what `train.distill` changes)
    def _advantages(self, batch: list[Trajectory]) -> list[float]:
        """One advantage per trajectory, against its group (`grpo.group_advantages`); `pack` spreads each over the
        trajectory's tokens."""
        r = self.recipe.rl
        rewards = torch.tensor([t.reward for t in batch], dtype=torch.float64)
        groups = torch.tensor([t.group for t in batch])
        return group_advantages(rewards, groups, r.advantage_std_norm, clip=r.advantage_clip).tolist()

    def _prepare_rows(self, batch: list[Trajectory], rows: list[dict]) -> None:
        """This rank's packed rows before training, for per-token inputs of `_token_advantages` (RL: none)."""

    def _token_advantages(self, m: dict, sel: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        """The advantage of every loss token of micro-batch m (sel: its loss targets; old: pi_old's log-probs of
        them, detached): here the trajectory's group advantage on each of its tokens."""
        return m["advantages"][:, 1:][sel]

    # ------------------------------------------------------------------ forward and backward
    def _forward_backward(self, micro: list[dict], num_tokens: int) -> dict[str, float]:
        r = self.recipe.rl
        sums = dict.fromkeys(("loss", "pg", "kl", "clip_fraction_sum", "tokens", "abs_diff_sum", "kl_sum",
                              "clipped", "masked_tokens", "masked_sequences"), 0.0)  # fmt: skip
        sums["abs_diff_max"] = 0.0
        device = self.par.device if self.par is not None else next(self.model.parameters()).device
        for m in micro:
            m = {k: v.to(device) for k, v in m.items()}
            sel = m["mask"][:, 1:]  # the trained tokens, as the targets of the positions before them
            logp = self._token_logprobs(self.model, m, sel)
            old = logp.detach()  # pi_old: one optimizer step per batch, so the ratio is 1 (its gradient is not)
            w, st = importance_weights(old, m["rollout_logp"][:, 1:][sel], m["sequence"][:, 1:][sel], r.importance,
                                       r.tis_min, r.tis_max, r.mask_threshold)  # fmt: skip
            ref = None
            if self.reference is not None:
                with torch.no_grad():
                    ref = self._token_logprobs(self.reference, m, sel)
            advantages = self._token_advantages(m, sel, old)
            loss, parts = policy_loss(logp, old, advantages, num_tokens, w, r.eps_low, r.eps_high, ref, r.kl_coef)
            # FSDP averages the ranks' gradients: each rank's part of the global sum counts world times
            (loss * self.world).backward()
            sums["loss"] += float(loss.detach())
            sums["pg"] += parts["pg"]
            sums["kl"] += parts["kl"]
            sums["clip_fraction_sum"] += parts["clip_fraction_sum"]
            for k in ("tokens", "abs_diff_sum", "kl_sum", "clipped", "masked_tokens", "masked_sequences"):
                sums[k] += st[k]
            sums["abs_diff_max"] = max(sums["abs_diff_max"], st["abs_diff_max"])
        return sums

    def _token_logprobs(self, model, m: dict, sel: torch.Tensor) -> torch.Tensor:
        """log p(token) of the selected targets under `model` at rl.temperature (the policy that sampled them:
        softmax(logits / T), as NeMo-RL and verl do): its forward for the hidden states (only the last position's
        logits are formed), then the LM head on the selected positions, chunk by chunk. The head has no bias, so
        dividing the hidden states by T divides the logits by T."""
        with autocast(model, self.recipe.train.precision):
            out = model(m["input_ids"], document_ids=m["document_ids"], logits_to_keep=1)
        h = out.hidden_states[:, :-1][sel]
        t = self.recipe.rl.temperature
        return linear_token_logprobs(h if t == 1 else h.float() / t, model.lm_head.weight, m["input_ids"][:, 1:][sel])

    def _log_keys(self, batch: list[Trajectory], stale: list[int], sums: dict, num_tokens: int) -> dict:
        if self.par is not None:  # the per-token sums of every rank
            names = ("tokens", "abs_diff_sum", "kl_sum", "clipped", "masked_tokens", "masked_sequences",
                     "clip_fraction_sum")  # fmt: skip
            sums.update(zip(names, self.par.sum([sums[n] for n in names])))
            top = torch.tensor([sums["abs_diff_max"]], dtype=torch.float64, device=self.par.device)
            dist.all_reduce(top, op=dist.ReduceOp.MAX)
            sums["abs_diff_max"] = float(top)
        n = max(1.0, sums["tokens"])
        by_env: dict[str, list[float]] = {}
        for t in batch:
            by_env.setdefault(t.env, []).append(t.reward)
        groups: dict[int, set[float]] = {}
        for t in batch:
            groups.setdefault(t.group, set()).add(t.reward)
        keys = {
            "reward": sum(t.reward for t in batch) / len(batch),
            **{f"reward_{env}": sum(v) / len(v) for env, v in sorted(by_env.items())},
            "accuracy": sum(t.reward >= 1.0 for t in batch) / len(batch),
            "staleness_max": max(stale),
            "staleness_mean": sum(stale) / len(stale),
            "trajectories": len(batch),
            "loss_tokens": num_tokens,
            "zero_variance_groups": sum(len(v) == 1 for v in groups.values()),
            "filtered_prompts": sum(self.filtered.values()),
            "truncated": sum(t.finish_reason == "length" for t in batch) / len(batch),
            "clip_fraction": sums["clip_fraction_sum"] / n,
            "mismatch_mean": sums["abs_diff_sum"] / n,
            "mismatch_max": sums["abs_diff_max"],
            "mismatch_kl": sums["kl_sum"] / n,
            "tis_clipped": sums["clipped"] / n,
            "masked_sequences": sums["masked_sequences"],
        }
        return keys

    def after_step(self) -> dict:
        """The MoE bias update (none with the router frozen), then the new weights to the rollout source; the
        version is the number of optimizer steps done."""
        rate = 0.0 if self.recipe.rl.freeze_router else self.recipe.balance.bias_update_rate
        out = {"expert_imbalance": balance_experts(self.model, rate)}
        self.version += 1
        if self.version < self.steps:  # after the last step no one samples again
            model = self._full_model()  # collective under torchrun
            if self.main:
                self.rollouts.publish(model, self.version)
        return out

    def finish(self, completed: bool) -> dict:
        if self.rollouts:
            self.rollouts.close()
        return {"pools": self.pools, "filtered": self.filtered}

    def state_dict(self) -> dict:
        return {"trained_prompts": self.trained_prompts}

    def load_state_dict(self, state: dict) -> None:
        self.trained_prompts = int(state["trained_prompts"])


# ---------------------------------------------------------------------------------------------- packing


def pack(trajectories: list[Trajectory], advantages: list[float], seq_len: int = 0) -> list[dict]:
    """Rows of 1-D tensors: input_ids, document_ids (one id per trajectory in the row), mask (True on the tokens
    trained on: the trajectory's loss_mask), rollout_logp, advantages (the trajectory's on each of its tokens) and
    sequence (the trajectory's index). seq_len 0: one trajectory per row; else trajectories first-fit into rows of
    at most seq_len tokens (a longer one gets a row of its own)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, t in enumerate(trajectories):
        if not t.token_ids:
            raise ValueError(f"trajectory {i} ({t.env} seed {t.seed}) has no tokens")
        if t.loss_mask[0]:
            raise ValueError(f"trajectory {i} ({t.env} seed {t.seed}) is trained on its first token, which nothing "
                             "predicts: the first token must be part of the prompt (loss_mask 0)")  # fmt: skip
        n = len(t.token_ids)
        fit = next((j for j, left in enumerate(room) if left >= n), None) if seq_len else None
        if fit is None:
            rows.append([i])
            room.append(seq_len - n)
        else:
            rows[fit].append(i)
            room[fit] -= n
    out = []
    for members in rows:
        parts = [trajectories[i] for i in members]
        lengths = [len(t.token_ids) for t in parts]
        out.append({
            "input_ids": torch.tensor([x for t in parts for x in t.token_ids], dtype=torch.long),
            "document_ids": torch.repeat_interleave(torch.arange(len(parts)), torch.tensor(lengths)),
            "mask": torch.tensor([bool(x) for t in parts for x in t.loss_mask]),
            "rollout_logp": torch.tensor([x for t in parts for x in t.logprobs], dtype=torch.float32),
            "advantages": torch.repeat_interleave(torch.tensor([advantages[i] for i in members],
                                                               dtype=torch.float32), torch.tensor(lengths)),
            "sequence": torch.repeat_interleave(torch.tensor(members), torch.tensor(lengths)),
        })  # fmt: skip
    return out


def collate(rows: list[dict]) -> dict:
    """Rows of different lengths -> (b, t) tensors, padded on the right: padding has its own document id and is
    never trained on."""
    t = max(len(row["input_ids"]) for row in rows)
    out = {}
    for key in rows[0]:
        padded = []
        for row in rows:
            v = row[key]
            fill = int(v.max()) + 1 if key == "document_ids" else 0
            padded.append(torch.cat([v, torch.full((t - len(v),), fill, dtype=v.dtype)]))
        out[key] = torch.stack(padded)
    return out


def _empty_row() -> dict:
    """A row with nothing to train on (2 padding tokens): ranks with fewer rows run it to keep FSDP in step."""
    return {
        "input_ids": torch.zeros(2, dtype=torch.long), "document_ids": torch.zeros(2, dtype=torch.long),
        "mask": torch.zeros(2, dtype=torch.bool), "rollout_logp": torch.zeros(2), "advantages": torch.zeros(2),
        "sequence": torch.full((2,), -1, dtype=torch.long),
    }  # fmt: skip
