"""The pretraining data loader: packed, blended, two-phase token streams over `hybridmoe prepare` output.

Bottom up:
- `TokenDataset`: one prepared directory, opened with numpy.memmap, its documents split into train and validation
  by a hash of (split seed, global document index). Opening checks each shard's sha256 against the manifest (once
  per process and file: `verify_shards`), so a corrupt or changed shard is an error instead of silently wrong data.
- `_Stream`: one dataset's train documents as an endless token stream in a seeded order reshuffled every epoch,
  cut into consecutive windows of `seq_len` tokens. This is Megatron-LM's GPTDataset (document index -> shuffled
  document order -> sample windows), computed on the fly from three counters instead of saved index arrays.
- blending: the source of each sample is the dataset whose realized sample count lags its target share the most,
  Megatron-LM BlendedDataset's `build_blending_indices`; deterministic, and the proportions track the weights at
  every step (each count stays within about one sample of weight * samples).
- `PretrainLoader`: phases of blends switched at token counts, as in the Nemotron 3 two-phase recipe, where phase 2
  changes only the data mixture (Nemotron 3 Nano technical report, NVIDIA, 2025); batching; exact resume from a
  JSON state.

The on-disk format (`FORMAT`), written by `hybridmoe prepare`:
- `manifest.json`: {"format", "dtype": "uint16"|"uint32", "vocab_size", "eod_token_id", "tokenizer", "field",
  "sources", "documents", "tokens", "bad_records", "shards": [{"name", "documents", "tokens", "sources", "sha256"}]};
- `<name>.bin`: little-endian token ids, every document's tokens followed by the eod token;
- `<name>.idx`: little-endian uint64, documents + 1 entries: where each document starts in the .bin, then the
  token count.

Packing contract, per sample of T = seq_len tokens: whole documents (each ending in eod) are concatenated and the
stream is cut every T tokens; a document that does not fit continues at the start of the next sample, so nothing
is dropped or truncated. `document_ids` (T,) starts at 0 in each sample and increases by one right after every eod
token (the eod belongs to the document it ends); the model uses it so no Mamba state or attention crosses
documents. Nemotron 3 itself pretrains on plain eod-concatenated sequences without such resets; a training loop
that wants that behaviour simply does not pass `document_ids` to the model.

Limits: labels are the unshifted input_ids (the model shifts internally), so the first token of each window is
never a target; Megatron avoids this by overlapping windows by one token, at the cost of samples of T + 1 tokens.
Per-dataset document arrays (the split, the epoch's order) hold 8 bytes per document in memory, as Megatron's
index arrays do. Checksum verification reads every byte once per process (in parallel threads; a progress bar when
it takes a while); under torchrun every process reads them. `verify=False` (`--no-verify`, `data.verify: false`)
skips it.

Shapes: B = batch size, T = seq_len.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from ..kernels.loss import IGNORE_INDEX

FORMAT = "hybridmoe-tokens-v1"
STATE_FORMAT = "hybridmoe-loader-v1"
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "val")
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_IDX_DTYPE = np.dtype("<u8")
_REPREPARE = "re-run `hybridmoe prepare` to rebuild the directory"
_NO_VERIFY = "--no-verify, data.verify: false in a recipe, verify=False in Python"
_HASH_CHUNK = 8 * 2**20
_HASH_THREADS = 8
# (real path, size, mtime, inode, sha256) of every shard file verified in this process: opened again, it is not reread.
_VERIFIED: set[tuple] = set()
_VERIFIED_LOCK = threading.Lock()


# ----------------------------------------------------------------------------------------------- one dataset
def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on a uint64 array (wrapping arithmetic): a well-mixed hash, identical on every
    platform and numpy version, unlike Python's hash()."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def is_validation(doc_indices: np.ndarray, val_fraction: float, seed: int = 0) -> np.ndarray:
    """Which of the global document indices fall in the validation split: hash(seed, index) / 2^64 < val_fraction.
    A document's split depends only on its own index, so appending shards to a directory leaves it unchanged."""
    key = _mix64(np.array([seed], dtype=np.uint64))
    u = (_mix64(np.asarray(doc_indices, dtype=np.uint64) ^ key) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return u < val_fraction


def document_ids_from_eod(tokens: np.ndarray, eod_token_id: int) -> np.ndarray:
    """Per-token document ids of packed tokens (..., T): 0 at the first token, +1 right after every eod token."""
    ids = np.zeros(tokens.shape, dtype=np.int64)
    np.cumsum(tokens[..., :-1] == eod_token_id, axis=-1, out=ids[..., 1:])
    return ids


def _check_size(path: Path, expected: int, what: str) -> None:
    if not path.is_file():
        raise ValueError(f"{path} is missing (the manifest lists it); {_REPREPARE}")
    size = path.stat().st_size
    if size != expected:
        raise ValueError(f"{path} holds {size} bytes but the manifest implies {expected} ({what}); {_REPREPARE}")


def _read_manifest(path: Path) -> dict:
    manifest_path = path / MANIFEST_NAME
    if not path.is_dir():
        raise FileNotFoundError(f"no prepared data directory at {path}; create one with `hybridmoe prepare`")
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path} has no {MANIFEST_NAME}; it is not a directory written by `hybridmoe prepare`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{manifest_path} is not valid JSON ({e}); {_REPREPARE}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{manifest_path}: format {got!r} is not {FORMAT!r}; {_REPREPARE} with this version")
    for key in ("dtype", "vocab_size", "eod_token_id", "documents", "tokens", "shards"):
        if key not in manifest:
            raise ValueError(f"{manifest_path} lacks {key!r}; {_REPREPARE}")
    if manifest["dtype"] not in _DTYPES:
        raise ValueError(f"{manifest_path}: dtype {manifest['dtype']!r} is not one of {sorted(_DTYPES)}; {_REPREPARE}")
    vocab, eod = manifest["vocab_size"], manifest["eod_token_id"]
    if not (isinstance(vocab, int) and isinstance(eod, int) and 0 <= eod < vocab):
        raise ValueError(f"{manifest_path}: eod_token_id {eod!r} must be an int in [0, vocab_size={vocab!r})")
    if vocab > np.iinfo(_DTYPES[manifest["dtype"]]).max + 1:
        raise ValueError(f"{manifest_path}: vocab_size {vocab} does not fit dtype {manifest['dtype']}; {_REPREPARE}")
    shards = manifest["shards"]
    if not isinstance(shards, list) or not all(isinstance(s, dict) for s in shards):
        raise ValueError(f"{manifest_path}: 'shards' must be a list of objects; {_REPREPARE}")
    for s in shards:
        name = s.get("name")
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise ValueError(f"{manifest_path}: shard name {name!r} must be a plain file name; {_REPREPARE}")
        for key in ("documents", "tokens"):
            if not isinstance(s.get(key), int) or s[key] < 0:
                raise ValueError(f"{manifest_path}: shard {name} needs a non-negative int {key!r}; {_REPREPARE}")
    for key in ("documents", "tokens"):
        total = sum(s[key] for s in shards)
        if manifest[key] != total:
            raise ValueError(f"{manifest_path}: {key} = {manifest[key]} but the shards sum to {total}; {_REPREPARE}")
    return manifest


def sha256_file(path: str | os.PathLike, progress=None) -> str:
    """Hex sha256 of a file, read in chunks; `progress` (a tqdm bar) is advanced by the bytes read."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)  # releases the GIL: threads hash files in parallel
            if progress is not None:
                progress.update(len(chunk))
    return digest.hexdigest()


def verify_shards(path: str | os.PathLike, manifest: dict) -> None:
    """Check every shard's .bin and .idx against the sha256 in the manifest; raise ValueError naming the first that
    differs. A file already verified in this process (same size, mtime and inode) is not read again."""
    from tqdm.auto import tqdm

    path = Path(path)
    todo = []  # (file, expected sha256, cache key)
    for shard in manifest["shards"]:
        name, sha = shard["name"], shard.get("sha256")
        if not (isinstance(sha, dict) and all(isinstance(sha.get(ext), str) for ext in ("bin", "idx"))):
            raise ValueError(
                f"{path / MANIFEST_NAME}: shard {name} has no sha256 of its .bin and .idx to verify it against; "
                f"{_REPREPARE}, or skip the check ({_NO_VERIFY})"
            )
        for ext in ("bin", "idx"):
            file = path / f"{name}.{ext}"
            st = file.stat()
            key = (os.path.realpath(file), st.st_size, st.st_mtime_ns, st.st_ino, sha[ext])
            if key not in _VERIFIED:
                todo.append((file, sha[ext], key))
    if not todo:
        return
    total = sum(key[1] for _, _, key in todo)
    bad = []
    # delay: no bar unless it takes a while.
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"verify {path}", delay=2.0)
    with bar, ThreadPoolExecutor(min(_HASH_THREADS, len(todo))) as pool:
        for (file, expected, key), digest in zip(todo, pool.map(lambda item: sha256_file(item[0], bar), todo)):
            if digest != expected:
                bad.append(f"{file}: sha256 {digest} is not the manifest's {expected}")
            else:
                with _VERIFIED_LOCK:
                    _VERIFIED.add(key)
    if bad:
        raise ValueError(
            f"{len(bad)} shard file(s) of {path} are corrupt or changed since `hybridmoe prepare` wrote them: "
            + "; ".join(bad[:5])
            + (f"; and {len(bad) - 5} more" if len(bad) > 5 else "")
            + ". Delete them and re-run `hybridmoe prepare` with the same inputs (it rebuilds only the missing "
            f"shards), or skip the check ({_NO_VERIFY})"
        )


class TokenDataset:
    """The documents of one prepared directory, split into "train" and "val".

    Documents are numbered globally in shard order (0 .. num_documents - 1). Document i is in "val" when
    is_validation(i, val_fraction, seed); the split is a pure function of (seed, i), stable across runs and when
    shards are appended. The split seed is deliberately separate from the training seed, so runs with different
    training seeds are validated on the same documents. verify: check the shards' sha256 (see verify_shards).
    """

    def __init__(self, path: str | os.PathLike, val_fraction: float = 0.01, seed: int = 0, verify: bool = True):
        if not 0.0 <= val_fraction <= 1.0:
            raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.path = Path(path)
        self.val_fraction, self.seed = float(val_fraction), seed
        self.manifest = _read_manifest(self.path)
        self.dtype = _DTYPES[self.manifest["dtype"]]
        self.vocab_size: int = self.manifest["vocab_size"]
        self.eod_token_id: int = self.manifest["eod_token_id"]
        self.tokenizer: str | None = self.manifest.get("tokenizer")
        self.num_documents: int = self.manifest["documents"]
        self.num_tokens_total: int = self.manifest["tokens"]

        for shard in self.manifest["shards"]:
            name, n_docs, n_tokens = shard["name"], shard["documents"], shard["tokens"]
            dtype_name = self.manifest["dtype"]
            _check_size(self.path / f"{name}.bin", n_tokens * self.dtype.itemsize, f"{n_tokens} tokens of {dtype_name}")
            _check_size(self.path / f"{name}.idx", (n_docs + 1) * 8, f"{n_docs} documents + 1 uint64 offsets")
        if verify:
            verify_shards(self.path, self.manifest)

        self._bins: list[np.ndarray] = []
        self._idxs: list[np.ndarray] = []
        split_docs = {s: [] for s in SPLITS}
        self._split_tokens = dict.fromkeys(SPLITS, 0)
        first_doc = 0
        for shard in self.manifest["shards"]:
            name, n_docs, n_tokens = shard["name"], shard["documents"], shard["tokens"]
            bin_path, idx_path = self.path / f"{name}.bin", self.path / f"{name}.idx"
            # np.memmap cannot map an empty file; an empty shard needs no mapping.
            tokens = np.memmap(bin_path, self.dtype, mode="r") if n_tokens else np.empty(0, self.dtype)
            idx = np.memmap(idx_path, _IDX_DTYPE, mode="r")
            lengths = np.diff(np.asarray(idx, dtype=np.int64))
            if idx[0] != 0 or idx[-1] != n_tokens or (lengths <= 0).any():
                raise ValueError(
                    f"{idx_path}: offsets must start at 0, grow by at least one token (the eod) per document and end "
                    f"at the token count {n_tokens}; {_REPREPARE}"
                )
            self._bins.append(tokens)
            self._idxs.append(idx)
            global_index = np.arange(first_doc, first_doc + n_docs, dtype=np.int64)
            val = is_validation(global_index, self.val_fraction, seed)
            for split, mask in (("train", ~val), ("val", val)):
                split_docs[split].append(global_index[mask])
                self._split_tokens[split] += int(lengths[mask].sum())
            first_doc += n_docs
        self._shard_first_doc = np.cumsum([0] + [s["documents"] for s in self.manifest["shards"]][:-1])
        self._split_docs = {s: np.concatenate(split_docs[s] or [np.empty(0, np.int64)]) for s in SPLITS}
        for docs in self._split_docs.values():
            docs.flags.writeable = False

    def documents(self, split: str) -> np.ndarray:
        """Global indices (int64, ascending, read-only) of the documents in `split` ("train" or "val")."""
        return self._split_docs[self._check_split(split)]

    def num_tokens(self, split: str) -> int:
        """Tokens (eod included) of the documents in `split`."""
        return self._split_tokens[self._check_split(split)]

    def document(self, index: int) -> np.ndarray:
        """The tokens of global document `index`, its final eod included: a read-only view into the memmap."""
        if not 0 <= index < self.num_documents:
            raise IndexError(f"document {index} out of range: {self.path} holds {self.num_documents} documents")
        shard = int(np.searchsorted(self._shard_first_doc, index, side="right")) - 1
        local = index - int(self._shard_first_doc[shard])
        idx = self._idxs[shard]
        return self._bins[shard][int(idx[local]) : int(idx[local + 1])]

    def check_ends_with_eod(self, index: int, tokens: np.ndarray) -> None:
        """Packing relies on every document ending in eod; checked as documents are read, not on open (cheap)."""
        if tokens[-1] != self.eod_token_id:
            raise ValueError(
                f"{self.path}: document {index} ends with token {int(tokens[-1])}, not eod {self.eod_token_id}; "
                + _REPREPARE
            )

    @staticmethod
    def _check_split(split: str) -> str:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return split

    def __repr__(self) -> str:
        return (
            f"TokenDataset({str(self.path)!r}, documents train/val {len(self.documents('train'))}/"
            f"{len(self.documents('val'))}, tokens train/val {self.num_tokens('train')}/{self.num_tokens('val')})"
        )


# ------------------------------------------------------------------------------------------------ one stream
class _Stream:
    """One dataset's train documents as an endless token stream.

    Epoch e visits every train document once, in the order permutation(seed, salt, e). The whole state is three
    counters: epoch, position (index into the epoch's order of the current document) and offset (tokens of that
    document already served); `fill` continues exactly from them.
    """

    def __init__(self, dataset: TokenDataset, seed: int, salt: int):
        self.dataset, self.seed, self.salt = dataset, seed, salt
        self.docs = dataset.documents("train")
        if len(self.docs) == 0:
            raise ValueError(
                f"{dataset.path} has no train documents ({dataset.num_documents} documents, val_fraction "
                f"{dataset.val_fraction}); lower val_fraction or give it weight 0"
            )
        self.epoch = self.position = self.offset = 0
        self._order_epoch, self._order = -1, self.docs

    def order(self) -> np.ndarray:
        """This epoch's document order (global indices); cached, recomputed once per epoch."""
        if self._order_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.salt, self.epoch])
            self._order, self._order_epoch = self.docs[rng.permutation(len(self.docs))], self.epoch
        return self._order

    def fill(self, out: np.ndarray) -> None:
        """Write the next len(out) tokens of the stream into out (T,)."""
        filled = 0
        while filled < len(out):
            index = int(self.order()[self.position])
            tokens = self.dataset.document(index)
            take = min(len(out) - filled, len(tokens) - self.offset)
            out[filled : filled + take] = tokens[self.offset : self.offset + take]
            filled += take
            self.offset += take
            if self.offset == len(tokens):
                self.dataset.check_ends_with_eod(index, tokens)
                self.position, self.offset = self.position + 1, 0
                if self.position == len(self.docs):
                    self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "offset": self.offset}

    def load_state_dict(self, state: Mapping) -> None:
        epoch, position, offset = (state[k] for k in ("epoch", "position", "offset"))
        if not all(isinstance(v, int) and v >= 0 for v in (epoch, position, offset)) or position >= len(self.docs):
            raise ValueError(f"stream state {dict(state)} does not fit {self.dataset.path} ({len(self.docs)} docs)")
        self.epoch, self.position = epoch, position
        length = len(self.dataset.document(int(self.order()[position])))
        if offset >= length:
            raise ValueError(f"stream state offset {offset} is past the end of its document ({length} tokens)")
        self.offset = offset


# ---------------------------------------------------------------------------------------------- the curriculum
@dataclass(frozen=True)
class Phase:
    """One stage of the data curriculum: a blend of prepared directories, used until the next phase starts.

    datasets: {path: weight}; weights are >= 0 (0 = unused in this phase), normalized to sum to one.
    until: the training-token count where the next phase starts. A value < 1 is a fraction of the loader's
    total_tokens (Nemotron 3 Nano: 23.5T of 25T = 0.94); a value >= 1 is an absolute token count. None for the
    last phase, which runs to the end.
    """

    datasets: Mapping[str | os.PathLike, float]
    until: float | int | None = None

    def __post_init__(self):
        if not isinstance(self.datasets, Mapping) or not self.datasets:
            raise ValueError(f"a phase needs a non-empty {{path: weight}} mapping, got {self.datasets!r}")
        for path, w in self.datasets.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"weight of {path} must be a finite number >= 0, got {w!r}")
        if sum(self.datasets.values()) <= 0:
            raise ValueError(f"a phase needs at least one weight > 0, got {dict(self.datasets)}")
        if self.until is not None and (
            isinstance(self.until, bool)
            or not isinstance(self.until, (int, float))
            or not self.until > 0
            or (self.until >= 1 and self.until != int(self.until))
        ):
            raise ValueError(f"until must be a fraction in (0, 1) or a whole token count >= 1, got {self.until!r}")

    @classmethod
    def from_dict(cls, d: Mapping) -> Phase:
        """{"datasets": {path: weight}, "until": ...}, as written in a YAML recipe."""
        unknown = set(d) - {"datasets", "until"}
        if unknown or "datasets" not in d:
            raise ValueError(f"a phase is {{'datasets': {{path: weight}}, 'until': ...}}, got keys {sorted(d)}")
        return cls(d["datasets"], d.get("until"))


PathLike = str | os.PathLike
# What a loader reads: one path, one {path: weight} blend, or a list of phases (Phase or {"datasets", "until"}).
DataSpec = PathLike | Mapping[PathLike, float] | Sequence[Phase | Mapping]


def _as_phases(data: DataSpec) -> list[Phase]:
    """A path (one dataset), a {path: weight} blend, or a sequence of phases (Phase or dict)."""
    if isinstance(data, (str, os.PathLike)):
        return [Phase({data: 1.0})]
    if isinstance(data, Mapping):
        return [Phase(data)]
    if isinstance(data, Sequence) and data:
        return [p if isinstance(p, Phase) else Phase.from_dict(p) for p in data]
    raise ValueError(f"expected a data path, a {{path: weight}} mapping or a list of phases, got {data!r}")


# -------------------------------------------------------------------------------------------------- the loader
@dataclass
class _BlendState:
    """The phase of the last batch and how many samples each dataset gave in that phase (reset at a switch)."""

    phase: int | None = None
    counts: list[int] = field(default_factory=list)


class PretrainLoader:
    """Endless batches {"input_ids", "labels", "document_ids"}: int64 tensors (B, T), labels = input_ids.

        loader = PretrainLoader([Phase({"data/web": 0.7, "data/code": 0.3}, until=0.94),
                                 Phase({"data/web": 0.4, "data/code": 0.3, "data/wiki": 0.3})],
                                seq_len=8192, batch_size=8, seed=0, total_tokens=25 * 10**12)
        for step, batch in zip(range(steps), loader):
            loss = model(**batch).loss        # loader.phase: the phase this batch came from

    `data`: a path (one dataset), a {path: weight} blend, or a list of phases (`Phase` or {"datasets", "until"}).
    The same path in several phases is one dataset with one stream, so it continues where it was. The batch's
    phase is decided by the tokens served before it: the switch happens at the first batch that starts at or after
    the phase boundary (exactly at it when it is a multiple of B * T). Iteration never ends; the training loop owns
    the step count. `state_dict()` is plain JSON data; a loader restored from it serves exactly the batches the
    original would have served next (batch_size may change on resume; the streams continue where they were).
    verify: check every dataset's shards against their sha256 on open (see verify_shards).
    """

    def __init__(
        self,
        data: DataSpec,
        *,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        total_tokens: int | None = None,
        val_fraction: float = 0.01,
        split_seed: int = 0,
        verify: bool = True,
    ):
        if not isinstance(seq_len, int) or seq_len < 2:
            raise ValueError(f"seq_len must be an int >= 2 (a sample needs an input and a target), got {seq_len!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.phases = _as_phases(data)
        self.seq_len, self.batch_size, self.seed, self.total_tokens = seq_len, batch_size, seed, total_tokens

        # Datasets in order of first appearance, one per real path.
        self.datasets: list[TokenDataset] = []
        where: dict[str, int] = {}
        for phase in self.phases:
            for path in phase.datasets:
                key = os.path.realpath(path)
                if key not in where:
                    where[key] = len(self.datasets)
                    self.datasets.append(TokenDataset(path, val_fraction=val_fraction, seed=split_seed, verify=verify))
        first = self.datasets[0]
        for ds in self.datasets[1:]:
            if (ds.vocab_size, ds.eod_token_id) != (first.vocab_size, first.eod_token_id) or (
                ds.tokenizer and first.tokenizer and ds.tokenizer != first.tokenizer
            ):
                raise ValueError(
                    f"{ds.path} and {first.path} were prepared with different tokenizers "
                    f"({ds.tokenizer!r} vocab {ds.vocab_size} eod {ds.eod_token_id} vs {first.tokenizer!r} vocab "
                    f"{first.vocab_size} eod {first.eod_token_id}); prepare every dataset of a run with one tokenizer"
                )
        self.eod_token_id, self.vocab_size = first.eod_token_id, first.vocab_size

        # weights[p, d]: phase p's normalized weight of dataset d. starts[p]: first token of phase p.
        self.weights = np.zeros((len(self.phases), len(self.datasets)))
        for p, phase in enumerate(self.phases):
            for path, w in phase.datasets.items():
                self.weights[p, where[os.path.realpath(path)]] += w
            self.weights[p] /= self.weights[p].sum()
        self.phase_starts = [0] + [self._boundary(p, phase.until) for p, phase in enumerate(self.phases[:-1])]
        if self.phases[-1].until is not None:
            raise ValueError(f"the last phase runs to the end; drop its until ({self.phases[-1].until})")
        if any(a >= b for a, b in zip(self.phase_starts, self.phase_starts[1:])):
            raise ValueError(f"phase boundaries must increase, got token counts {self.phase_starts[1:]}")

        used = self.weights.max(axis=0) > 0
        self._streams = [_Stream(ds, seed, d) if used[d] else None for d, ds in enumerate(self.datasets)]
        self._blend = _BlendState()
        self.tokens_served = 0
        self.batches_served = 0
        self.last_sources: list[int] = []  # dataset index of each row of the last batch

    def _boundary(self, p: int, until) -> int:
        if until is None:
            raise ValueError(f"phase {p} needs `until` (where phase {p + 1} starts); only the last phase has none")
        if until >= 1:
            tokens = int(until)
        elif self.total_tokens is None:
            raise ValueError(f"phase {p} ends at a fraction ({until}) of total_tokens; pass total_tokens")
        else:
            tokens = round(until * self.total_tokens)
        if self.total_tokens is not None and tokens >= self.total_tokens:
            raise ValueError(f"phase {p + 1} starts at token {tokens}, at or after total_tokens {self.total_tokens}")
        return tokens

    @property
    def phase(self) -> int | None:
        """The phase (index into `phases`) of the batch returned last; None before the first."""
        return self._blend.phase

    def phase_at(self, tokens: int) -> int:
        """The phase of a batch that starts after `tokens` training tokens."""
        return sum(tokens >= start for start in self.phase_starts) - 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        p = self.phase_at(self.tokens_served)
        if p != self._blend.phase:
            self._blend = _BlendState(p, [0] * len(self.datasets))
        counts, weights = self._blend.counts, self.weights[p]
        tokens_BT = np.empty((self.batch_size, self.seq_len), dtype=np.int64)
        self.last_sources = []
        for row in tokens_BT:
            # Megatron's blending rule: the dataset furthest below its target count after this sample.
            d = int(np.argmax(weights * (sum(counts) + 1) - np.asarray(counts)))
            counts[d] += 1
            self._streams[d].fill(row)
            self.last_sources.append(d)
        self.tokens_served += tokens_BT.size
        self.batches_served += 1
        return _batch(tokens_BT, document_ids_from_eod(tokens_BT, self.eod_token_id))

    # ------------------------------------------------------------------------------------------- validation
    def val_batches(
        self,
        dataset: int | str | os.PathLike | None = None,
        batch_size: int | None = None,
        max_batches: int | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """One pass over held-out documents: all datasets of the loader in order, or only `dataset` (an index into
        `datasets` or a path). See `validation_batches`."""
        if dataset is None:
            chosen = self.datasets
        elif isinstance(dataset, int):
            chosen = [self.datasets[dataset]]
        else:
            matches = [ds for ds in self.datasets if os.path.realpath(ds.path) == os.path.realpath(dataset)]
            if not matches:
                raise ValueError(
                    f"{dataset} is not one of this loader's datasets: {[str(d.path) for d in self.datasets]}"
                )
            chosen = matches
        return validation_batches(chosen, self.seq_len, batch_size or self.batch_size, max_batches)

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to continue exactly: plain JSON data."""
        return {
            "format": STATE_FORMAT,
            "seed": self.seed,
            "datasets": [
                {"path": str(ds.path), "documents": ds.num_documents, "train_documents": len(ds.documents("train"))}
                for ds in self.datasets
            ],
            "streams": [s.state_dict() if s is not None else None for s in self._streams],
            "phase": self._blend.phase,
            "phase_counts": list(self._blend.counts),
            "tokens_served": self.tokens_served,
            "batches_served": self.batches_served,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from `state_dict()` output. The datasets must be the same (by document counts; paths may have
        moved) and so must the seed; anything else would not continue the same streams."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a loader state (format {state.get('format')!r}, expected {STATE_FORMAT!r})")
        if state["seed"] != self.seed:
            raise ValueError(f"the state is for seed {state['seed']}, this loader has seed {self.seed}")
        ours = self.state_dict()["datasets"]
        theirs = state["datasets"]
        if len(theirs) != len(ours) or any(
            (a["documents"], a["train_documents"]) != (b["documents"], b["train_documents"])
            for a, b in zip(theirs, ours)
        ):
            raise ValueError(
                f"the state was saved for datasets {theirs}, this loader has {ours}: the data, its order in the "
                "phases, or val_fraction / split_seed changed, so the saved positions would not mean the same"
            )
        for stream, s in zip(self._streams, state["streams"]):
            if stream is not None and s is not None:
                stream.load_state_dict(s)
        counts = state["phase_counts"]
        if state["phase"] is not None and len(counts) != len(self.datasets):
            raise ValueError(f"phase_counts {counts} should hold one count per dataset ({len(self.datasets)})")
        self._blend = _BlendState(state["phase"], list(counts))
        self.tokens_served, self.batches_served = state["tokens_served"], state["batches_served"]

    def summary(self) -> dict:
        """The derived numbers worth printing at start and saving beside a checkpoint (JSON data)."""
        return {
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "tokens_per_batch": self.seq_len * self.batch_size,
            "seed": self.seed,
            "total_tokens": self.total_tokens,
            "datasets": [
                {
                    "path": str(ds.path),
                    **{f"{s}_documents": len(ds.documents(s)) for s in SPLITS},
                    **{f"{s}_tokens": ds.num_tokens(s) for s in SPLITS},
                }
                for ds in self.datasets
            ],
            "phases": [
                {"start_tokens": start, "weights": {str(ds.path): float(w) for ds, w in zip(self.datasets, weights)}}
                for start, weights in zip(self.phase_starts, self.weights)
            ],
        }


# ---------------------------------------------------------------------------------------------- validation
def validation_batches(
    datasets: Sequence[TokenDataset], seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over the "val" documents of `datasets`, in dataset then document-index order (no shuffling),
    packed like training samples. The last sample is padded (input eod, label -100, a document id of its own) and
    the last batch may hold fewer rows, so every held-out token is a target exactly once (less the first token
    of each window, as in training). max_batches: stop after that many (a fixed prefix, for quick checks)."""
    if seq_len < 2 or batch_size < 1:
        raise ValueError(f"seq_len must be >= 2 and batch_size >= 1, got {seq_len} and {batch_size}")
    if sum(len(ds.documents("val")) for ds in datasets) == 0:
        raise ValueError(
            f"no validation documents in {[str(ds.path) for ds in datasets]} (val_fraction "
            f"{[ds.val_fraction for ds in datasets]}); raise val_fraction"
        )
    batches = _validation_batches(datasets, seq_len, batch_size)
    return batches if max_batches is None else islice(batches, max_batches)


def _validation_batches(datasets, seq_len, batch_size):
    windows = _packed_val_windows(datasets, seq_len)
    while rows := list(islice(windows, batch_size)):
        yield _padded_batch(rows, seq_len, datasets[0].eod_token_id)


def _packed_val_windows(datasets, seq_len) -> Iterator[np.ndarray]:
    """Windows of seq_len tokens over the concatenated val documents; the last one may be shorter."""
    window = np.empty(seq_len, dtype=np.int64)
    filled = 0
    for ds in datasets:
        for index in ds.documents("val"):
            tokens = ds.document(int(index))
            ds.check_ends_with_eod(int(index), tokens)
            pos = 0
            while pos < len(tokens):
                take = min(seq_len - filled, len(tokens) - pos)
                window[filled : filled + take] = tokens[pos : pos + take]
                filled, pos = filled + take, pos + take
                if filled == seq_len:
                    yield window.copy()
                    filled = 0
    if filled:
        yield window[:filled].copy()


def _padded_batch(rows: list[np.ndarray], seq_len: int, eod: int) -> dict[str, torch.Tensor]:
    tokens_BT = np.full((len(rows), seq_len), eod, dtype=np.int64)
    labels_BT = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    for b, row in enumerate(rows):
        tokens_BT[b, : len(row)] = row
        labels_BT[b, : len(row)] = row
    doc_ids_BT = document_ids_from_eod(tokens_BT, eod)
    for b, row in enumerate(rows):  # padding is a document of its own, never a continuation of the last one
        if len(row) < seq_len:
            doc_ids_BT[b, len(row) :] = doc_ids_BT[b, len(row) - 1] + 1
    return {
        "input_ids": torch.from_numpy(tokens_BT),
        "labels": torch.from_numpy(labels_BT),
        "document_ids": torch.from_numpy(doc_ids_BT),
    }


def _batch(tokens_BT: np.ndarray, doc_ids_BT: np.ndarray) -> dict[str, torch.Tensor]:
    input_ids = torch.from_numpy(tokens_BT)
    return {"input_ids": input_ids, "labels": input_ids.clone(), "document_ids": torch.from_numpy(doc_ids_BT)}
