"""Multi-teacher on-policy distillation, MOPD (`hybridmoe distill RECIPE`): the GRPO stage with another advantage.

The last post-training step of Nemotron 3 Ultra (the Nemotron 3 Ultra technical report, NVIDIA, 2025), after
MiMo-V2-Flash (arXiv 2601.02780, eq. 8-9) and on-policy distillation (Agarwal et al., arXiv 2306.13649; Thinking
Machines' tinker-cookbook `tinker_cookbook/distillation/train_on_policy.py`): the student samples (one rollout per
prompt), the teacher of the sample's environment scores every token the student generated, and the per-token
advantage

    A_t = opd_weight * clip(sg(log p_teacher(y_t) - log p_old(y_t)), -c, c) + orm_weight * A_grpo

(a single-sample estimate of minus the reverse KL, KL(student || teacher), at token t, plus optionally the
environment reward's group advantage) goes into GRPO's clipped, importance-weighted policy-gradient loss. p_old is
the trainer's own log-probability (one optimizer step per batch, as in `train.rl`), the log-ratio is clipped to
+-distill.logratio_clip (unbounded ratios are a known failure mode: NeMo-RL's `OPDAdvantageEstimator`,
nemo_rl/algorithms/advantage_estimator.py). Each trajectory goes to exactly one teacher: its environment's in
distill.teachers, else distill.default_teacher; no ensembling.

Everything else is `train.rl.RLStage`'s: the session, the prompts, rollouts (sync or async) and their staleness
check, packing, the trainer's log-probabilities, the loss and its log keys. `DistillStage` overrides three methods:
the per-trajectory advantage (the group advantage only when orm_weight > 0 and groups have >= 2 samples), the rows'
per-token teacher log-probabilities (`_prepare_rows`: this rank's trajectories, grouped by teacher and packed into
rows as the trainer packs them, scored with the teacher's forward and the chunked LM head at rl.temperature, like
the student's, `grpo.linear_token_logprobs`, so no (tokens, vocab) tensor is kept) and the per-token advantage.

Teachers are loaded once, frozen and in eval mode, each checkpoint once however many environments share it, and
whole on every rank (a teacher must fit on one device). They may be another preset or size but must use the
student's tokenizer: the vocabularies and special tokens are compared and a mismatch is refused.

The optional warm-up (distill.warmup.samples > 0, one process): each environment's teacher plays
`samples` episodes through the agent loop; those with the full reward (or all) are written as SFT conversations
(OpenAI messages with reasoning_content and tools, train.out_dir/warmup/data.jsonl) and the SFT stage
(`train.sft`) trains the student on them (train.out_dir/warmup); MOPD then starts from that checkpoint.

Log keys beyond RL's: reverse_kl (the mean over loss tokens of log p_old - log p_teacher, unclipped: the sampled
estimate of KL(student || teacher)), reverse_kl_<env> per environment, logratio_clipped (the fraction of loss tokens
whose log-ratio the clip moved) and teacher_samples_<name> (trajectories each teacher scored this step; <name>: the
environment the teacher is given for, or `default`).
"""

from __future__ import annotations

import dataclasses
import json
import os

import torch

from ..envs.base import Trajectory
from ..utils import atomic_write_text
from .config import DistillRecipe
from .model import DTYPES, resolve_init
from .rl import RLStage, collate, pack
from .session import run


def distill(recipe: DistillRecipe, resume: bool = False, stop_after: int | None = None,
            peak_gflops: float | None = None):  # fmt: skip
    """Run (or resume) a MOPD recipe, after its warm-up SFT when it has one; the summary of `session.run` (plus
    `pools`, `filtered` and, with a warm-up, `warmup`)."""
    recipe.validate()
    warm = None
    if recipe.distill.warmup.samples:
        warm = warmup(recipe)
        recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, init_from=warm["checkpoint"]))
    summary = run(recipe, DistillStage, resume=resume, stop_after=stop_after, peak_gflops=peak_gflops)
    if warm is not None:
        summary["warmup"] = warm
    return summary


# ---------------------------------------------------------------------------------------------- the arithmetic


def mopd_advantages(
    teacher_logp: torch.Tensor,
    old_logp: torch.Tensor,
    clip: float,
    opd_weight: float = 1.0,
    orm_advantages: torch.Tensor | None = None,
    orm_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per loss token (all (n,)): A = opd_weight * clamp(teacher - old, -clip, clip) + orm_weight * orm, detached.
    Returns (A, the unclipped log-ratio teacher - old)."""
    ratio = (teacher_logp.detach() - old_logp.detach()).to(old_logp.dtype)
    adv = opd_weight * ratio.clamp(-clip, clip)
    if orm_weight:
        if orm_advantages is None:
            raise ValueError("orm_weight > 0 needs the outcome-reward advantages (orm_advantages)")
        adv = adv + orm_weight * orm_advantages.detach().to(adv.dtype)
    return adv, ratio


def route(env: str, teachers: dict[str, str], default: str | None) -> tuple[str, str]:
    """The teacher of an environment's trajectories: (name, checkpoint); name is the environment when it has its own
    teacher in `teachers`, else `default`."""
    if env in teachers:
        return env, teachers[env]
    if default is not None:
        return "default", default
    raise ValueError(f"environment {env!r} has no teacher: give distill.teachers.{env} or distill.default_teacher "
                     f"(teachers are given for {sorted(teachers) or 'no environment'})")  # fmt: skip


def check_tokenizer(student, student_name: str, teacher_dir: str) -> None:
    """Refuse a teacher whose tokenizer (in its checkpoint) differs from the student's: the teacher scores the
    student's token ids, so both must give every id the same string, special tokens included."""
    from transformers import AutoTokenizer

    try:
        teacher = AutoTokenizer.from_pretrained(teacher_dir)
    except Exception as e:
        raise ValueError(
            f"teacher checkpoint {teacher_dir}: no tokenizer can be loaded from it ({type(e).__name__}: {e}); a "
            f"teacher directory must hold its tokenizer, the student's ({student_name})"
        ) from e
    problems = []
    sv, tv = student.get_vocab(), teacher.get_vocab()
    if sv != tv:
        differ = sum(tv.get(k) != v for k, v in sv.items()) + len(set(tv) - set(sv))
        problems.append(f"vocabularies differ ({len(sv)} vs {len(tv)} tokens, {differ} token(s) differ)")

    def specials(tok):
        return {i: (t.content, t.special) for i, t in tok.added_tokens_decoder.items()}, tok.special_tokens_map

    if specials(student) != specials(teacher):
        problems.append(f"special tokens differ ({student.all_special_tokens} vs {teacher.all_special_tokens})")
    if problems:
        raise ValueError(f"the teacher {teacher_dir} and the student {student_name} use different tokenizers: "
                         f"{'; '.join(problems)}. MOPD scores the student's token ids with the teacher, so it needs "
                         "a teacher trained with the student's tokenizer")  # fmt: skip


def load_teacher(path: str, precision: str, device) -> torch.nn.Module:
    """A teacher checkpoint (a model directory) as a frozen model in eval mode on `device`."""
    from ..modeling import HybridMoEForCausalLM

    model = HybridMoEForCausalLM.from_pretrained(path, dtype=DTYPES[precision])
    model.requires_grad_(False)
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------- the stage


class DistillStage(RLStage):
    streams = False  # `_prepare_rows` starts the step's per-environment statistics over: it takes whole batches

    def __init__(self, recipe: DistillRecipe, ckpt: str | None, par):
        from ..data.tokenizer import load_tokenizer

        d = recipe.distill
        # the teachers' tokenizers are checked before anything costly (the student, the pass-rate filter)
        student_name = recipe.model.tokenizer or resolve_init(recipe.model.init_from)
        student_tok = load_tokenizer(student_name)
        self.routes = {}  # env -> (teacher name, checkpoint)
        for env in sorted(recipe.envs.ratios):
            name, path = route(env, d.teachers, d.default_teacher)
            self.routes[env] = (name, resolve_init(path))
        for path in sorted({p for _, p in self.routes.values()}):
            check_tokenizer(student_tok, student_name, path)
        super().__init__(recipe, ckpt, par)
        device = self.par.device if self.par is not None else next(self.model.parameters()).device
        self.teachers = {}  # checkpoint -> model, each loaded once
        for path in sorted({p for _, p in self.routes.values()}):
            self.teachers[path] = load_teacher(path, recipe.train.precision, device)
            if self.teachers[path].config.vocab_size < len(self.tok):
                raise ValueError(f"the teacher {path} has vocab_size={self.teachers[path].config.vocab_size}, fewer "
                                 f"than the tokenizer's {len(self.tok)} tokens")  # fmt: skip
        self.env_names = sorted(self.routes)
        self.teacher_names = sorted({name for name, _ in self.routes.values()})
        self._stats = None

    # ------------------------------------------------------------------ advantages
    def _advantages(self, batch: list[Trajectory]) -> list[float]:
        """The outcome-reward part: RL's group advantage when it is weighed in, else 0."""
        if self.recipe.distill.orm_weight == 0:
            return [0.0] * len(batch)
        return super()._advantages(batch)

    def _prepare_rows(self, batch: list[Trajectory], rows: list[dict]) -> None:
        """Every row gets teacher_logp: the log-probability each token has under its trajectory's teacher (0 off
        the loss tokens). This rank's trajectories are scored teacher by teacher."""
        mine = sorted({int(k) for row in rows for k in row["sequence"].unique().tolist() if k >= 0})
        by_teacher: dict[str, list[int]] = {}
        counts = dict.fromkeys(self.teacher_names, 0)
        for i in mine:
            if batch[i].env not in self.routes:
                raise ValueError(f"the rollout source gave a trajectory of environment {batch[i].env!r}, which has no "
                                 f"teacher (teachers are routed for {self.env_names})")  # fmt: skip
            name, path = self.routes[batch[i].env]
            by_teacher.setdefault(path, []).append(i)
            counts[name] += 1
        scored: dict[int, torch.Tensor] = {}
        for path, members in by_teacher.items():
            scored.update(zip(members, self._teacher_logprobs(self.teachers[path], [batch[i] for i in members])))
        for row in rows:
            seq, lengths = torch.unique_consecutive(row["sequence"], return_counts=True)
            row["teacher_logp"] = torch.cat([scored[k] if k >= 0 else torch.zeros(n)
                                             for k, n in zip(seq.tolist(), lengths.tolist())])  # fmt: skip
        device = self.par.device if self.par is not None else next(self.model.parameters()).device
        self._stats = {
            "env_of": torch.tensor([self.env_names.index(t.env) for t in batch], device=device),
            "sums": torch.zeros(len(self.env_names), 3, dtype=torch.float64, device=device),  # -ratio, tokens, clipped
            "teachers": counts,
        }

    def _teacher_logprobs(self, teacher, trajectories: list[Trajectory]) -> list[torch.Tensor]:
        """log p_teacher of every token of each trajectory (0.0 where loss_mask is 0), from rows packed as the
        trainer packs them, rl.micro_batch_size rows per forward."""
        r = self.recipe.rl
        rows = pack(trajectories, [0.0] * len(trajectories), r.seq_len)
        out = [torch.zeros(len(t.token_ids)) for t in trajectories]
        device = next(teacher.parameters()).device
        for start in range(0, len(rows), r.micro_batch_size):
            m = {k: v.to(device) for k, v in collate(rows[start : start + r.micro_batch_size]).items()}
            sel = m["mask"][:, 1:]
            with torch.no_grad():
                logp = self._token_logprobs(teacher, m, sel).float().cpu()
            seq = m["sequence"][:, 1:][sel].cpu()
            for k in seq.unique().tolist():
                loss_positions = torch.tensor(trajectories[k].loss_mask).nonzero().squeeze(1)
                out[k][loss_positions] = logp[seq == k]
        return out

    def _token_advantages(self, m: dict, sel: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        d = self.recipe.distill
        orm = m["advantages"][:, 1:][sel]
        adv, ratio = mopd_advantages(m["teacher_logp"][:, 1:][sel], old, d.logratio_clip, d.opd_weight, orm,
                                     d.orm_weight)  # fmt: skip
        env = self._stats["env_of"][m["sequence"][:, 1:][sel]]
        sums = self._stats["sums"]
        ratio = ratio.double()
        sums[:, 0].index_add_(0, env, -ratio)
        sums[:, 1].index_add_(0, env, torch.ones_like(ratio))
        sums[:, 2].index_add_(0, env, (ratio.abs() > d.logratio_clip).double())
        return adv

    def _log_keys(self, batch: list[Trajectory], stale: list[int], sums: dict, num_tokens: int) -> dict:
        keys = super()._log_keys(batch, stale, sums, num_tokens)
        s = self._stats["sums"]
        counts = [float(self._stats["teachers"][name]) for name in self.teacher_names]
        if self.par is not None:  # every rank's tokens and trajectories
            flat = self.par.sum(s.flatten().tolist() + counts)
            s = torch.tensor(flat[: s.numel()], dtype=torch.float64).view(s.shape)
            counts = flat[s.numel() :]
        s = s.cpu()
        total = s.sum(0)
        keys["reverse_kl"] = float(total[0] / total[1]) if total[1] else 0.0
        keys["logratio_clipped"] = float(total[2] / total[1]) if total[1] else 0.0
        for env, (kl, n, _) in zip(self.env_names, s.tolist()):
            if n:  # an environment without loss tokens this step has no estimate
                keys[f"reverse_kl_{env}"] = kl / n
        for name, n in zip(self.teacher_names, counts):
            keys[f"teacher_samples_{name}"] = int(n)
        return keys


# ---------------------------------------------------------------------------------------------- warm-up


def warmup(recipe: DistillRecipe) -> dict:
    """The warm-up SFT (one process): teacher samples -> train.out_dir/warmup/data.jsonl -> `train.sft` from the
    student's starting weights into train.out_dir/warmup. Both parts are skipped when done already (a resumed run).
    Returns {checkpoint, conversations, kept (per env), sampled (per env)}."""
    import torch.distributed as dist

    from ..envs.agent import EngineGenerator, make_envs, play
    from ..serve.sampling import SamplingParams
    from ..tasks.base import split_seeds
    from .checkpoint import latest_checkpoint
    from .config import SFTRecipe
    from .rollout import engine_copy
    from .sft import sft

    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("distill.warmup runs in one process, not under torchrun: run the warm-up's SFT on its own "
                         "first and give its checkpoint as model.init_from with distill.warmup.samples=0")  # fmt: skip
    d, w, e, r = recipe.distill, recipe.distill.warmup, recipe.envs, recipe.rl
    out = os.path.join(recipe.train.out_dir, "warmup")
    data = os.path.join(out, "data.jsonl")
    os.makedirs(out, exist_ok=True)
    report_path = os.path.join(out, "samples.json")
    student_name = recipe.model.tokenizer or resolve_init(recipe.model.init_from)
    if not os.path.exists(data):
        from ..data.tokenizer import load_tokenizer

        tok = load_tokenizer(student_name)
        envs = make_envs(sorted(e.ratios))
        params = SamplingParams(temperature=r.temperature, max_tokens=r.max_new_tokens, logprobs=0)
        lines, kept, sampled = [], {}, {}
        for env in sorted(e.ratios):
            _, path = route(env, d.teachers, d.default_teacher)
            path = resolve_init(path)
            check_tokenizer(tok, student_name, path)
            teacher = load_teacher(path, "fp32", "cpu")
            engine = engine_copy(teacher, tok, max_num_seqs=r.max_num_seqs, max_model_len=r.max_model_len,
                                 seed=recipe.train.seed)  # fmt: skip
            seeds = list(split_seeds("train", e.pool, e.offset))[: w.samples]
            rollouts = play(
                {env: envs[env]}, [(env, s) for s in seeds], EngineGenerator(engine), tok, params=params,
                difficulty=e.difficulty, reasoning=e.reasoning, max_new_tokens=r.max_new_tokens,
            )  # fmt: skip
            good = [x for x in rollouts if x.episode is not None and x.finish_reason != "error"
                    and (w.keep == "all" or (x.reward is not None and x.reward.total >= 1.0))]  # fmt: skip
            for x in good:
                record = {"messages": x.episode.messages}
                if x.episode.tools:
                    record["tools"] = x.episode.tools
                lines.append(json.dumps(record))
            kept[env], sampled[env] = len(good), len(rollouts)
        if not lines:
            raise ValueError(f"the warm-up kept no conversation: the teachers earned the full reward on none of "
                             f"{sum(sampled.values())} episodes; set distill.warmup.keep=all or raise "
                             "distill.warmup.samples")  # fmt: skip
        atomic_write_text(report_path, json.dumps({"kept": kept, "sampled": sampled}))
        atomic_write_text(data, "\n".join(lines) + "\n")
    with open(report_path) as fh:
        report = json.load(fh)
    sft_recipe = SFTRecipe.from_dict({
        "model": {"init_from": recipe.model.init_from, "preset": recipe.model.preset,
                  "overrides": dict(recipe.model.overrides)},
        "data": {"datasets": {data: 1.0}, "tokenizer": student_name, "seq_len": w.seq_len,
                 "batch_size": w.batch_size, "drop_long": True},
        "optim": {"lr": w.lr, "min_lr": 0.0, "schedule": "constant", "weight_decay": 0.0},
        "train": {"steps": w.steps, "seed": recipe.train.seed, "precision": recipe.train.precision, "out_dir": out,
                  "progress": recipe.train.progress, "tensorboard": recipe.train.tensorboard,
                  "peak_gflops": recipe.train.peak_gflops, "val_batches": 0, "keep_last": 1},
    })  # fmt: skip
    done = latest_checkpoint(out)
    if done is None or not done.endswith(f"{w.steps:07d}"):
        sft(sft_recipe, resume=done is not None)
    checkpoint = latest_checkpoint(out)
    return {"checkpoint": checkpoint, "conversations": sum(report["kept"].values()), **report}
