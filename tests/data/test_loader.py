"""The pretraining loader on tiny synthetic prepared directories (written here in the `hybridmoe prepare` format).

Document k of a fixture holds the consecutive ids base_k, base_k + 1, ... followed by eod (0), with disjoint ranges
across documents and datasets, so every non-eod token tells which dataset, document and position it came from.
"""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import EOD, write_prepared
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridmoe.data.loader import (
    Phase,
    PretrainLoader,
    TokenDataset,
    document_ids_from_eod,
    is_validation,
)


def make_docs(lengths, base=1):
    """Documents of the given content lengths holding disjoint runs of consecutive ids starting at `base`."""
    docs = []
    for n in lengths:
        docs.append(list(range(base, base + n)))
        base += n
    return docs


def random_docs(n, seed, base=1, max_len=12):
    return make_docs(np.random.default_rng(seed).integers(0, max_len, size=n).tolist(), base)


def take(loader, n):
    return [next(loader) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


def split_documents(stream):
    """Cut a token stream after every eod: the documents it holds (each ending in eod)."""
    ends = np.flatnonzero(stream == EOD) + 1
    return [tuple(p) for p in np.split(stream, ends) if len(p)]


def check_packing(batch, docs, seq_len, batch_size):
    """The packing contract for one batch over documents `docs` (without eod)."""
    where = {tok: (k, i) for k, doc in enumerate(docs) for i, tok in enumerate(doc)}
    ids, labels, doc_ids = batch["input_ids"], batch["labels"], batch["document_ids"]
    for t in (ids, labels, doc_ids):
        assert t.dtype == torch.int64 and t.shape == (batch_size, seq_len)
    assert torch.equal(ids, labels)
    for row, row_ids in zip(ids.numpy(), doc_ids.numpy()):
        assert row_ids[0] == 0
        assert np.array_equal(np.diff(row_ids), (row[:-1] == EOD).astype(np.int64))  # +1 exactly after each eod
        groups = [row[row_ids == g] for g in range(row_ids[-1] + 1)]
        for g, piece in enumerate(groups):
            content, ends = (piece[:-1], True) if piece[-1] == EOD else (piece, False)
            assert ends or g == len(groups) - 1  # only the last piece may continue into the next sample
            if len(content) == 0:
                continue
            (k, first), *rest = [where[int(tok)] for tok in content]
            assert [w for w in rest] == [(k, first + i + 1) for i in range(len(rest))]  # one contiguous piece
            assert first == 0 or g == 0  # only the first piece may continue the previous sample's document
            if ends:
                assert first + len(content) == len(docs[k])  # the eod follows the document's last token


# ---------------------------------------------------------------------------------------------------- packing
@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 20), min_size=1, max_size=12),
    seq_len=st.integers(2, 17),
    batch_size=st.integers(1, 3),
    n_shards=st.integers(1, 3),
    seed=st.integers(0, 3),
)
def test_packing_never_crosses_documents_and_drops_nothing(lengths, seq_len, batch_size, n_shards, seed):
    docs = make_docs(lengths)
    n_shards = min(n_shards, len(docs))
    shard_docs = [len(a) for a in np.array_split(np.arange(len(docs)), n_shards)]
    epoch_tokens = sum(lengths) + len(lengths)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_prepared(Path(tmp) / "d", docs, shard_docs, dtype="uint16" if seed % 2 else "uint32")
        loader = PretrainLoader(path, seq_len=seq_len, batch_size=batch_size, seed=seed, val_fraction=0.0)
        n_batches = -(-2 * epoch_tokens // (seq_len * batch_size)) + 1
        batches = take(loader, n_batches)
    for batch in batches:
        check_packing(batch, docs, seq_len, batch_size)
    stream = torch.cat([b["input_ids"].reshape(-1) for b in batches]).numpy()
    everything = sorted(tuple([*d, EOD]) for d in docs)
    for epoch in range(2):  # each epoch: every document exactly once, whole
        part = stream[epoch * epoch_tokens : (epoch + 1) * epoch_tokens]
        assert sorted(split_documents(part)) == everything


def test_epoch_holds_every_train_document_once_then_reshuffles(tmp_path):
    docs = random_docs(60, seed=1)
    loader = PretrainLoader(write_prepared(tmp_path / "d", docs, [25, 35]), seq_len=16, batch_size=2, val_fraction=0.3)
    ds = loader.datasets[0]
    train, val = ds.documents("train"), ds.documents("val")
    assert len(val) > 0 and ds.num_tokens("train") == sum(len(docs[i]) + 1 for i in train)
    batches = take(loader, -(-2 * ds.num_tokens("train") // 32))
    stream = torch.cat([b["input_ids"].reshape(-1) for b in batches]).numpy()
    n = ds.num_tokens("train")
    epochs = [split_documents(stream[:n]), split_documents(stream[n : 2 * n])]
    for epoch in epochs:
        assert sorted(epoch) == sorted(tuple([*docs[i], EOD]) for i in train)
    assert epochs[0] != epochs[1]  # the order is reshuffled every epoch
    assert loader.state_dict()["streams"][0]["epoch"] == 2


# ---------------------------------------------------------------------------------------------------- blending
def test_blend_tracks_weights_at_every_step(tmp_path):
    bases = [1, 100_000, 200_000, 300_000]
    paths = [write_prepared(tmp_path / f"d{i}", random_docs(20, i, base)) for i, base in enumerate(bases)]
    weights = [5, 3, 2, 0]  # normalized by the loader; weight 0: never sampled
    loader = PretrainLoader(dict(zip(paths, weights)), seq_len=8, batch_size=4, val_fraction=0.0)
    target = np.array(weights) / sum(weights)
    counts = np.zeros(4)
    for step in range(50):
        batch = next(loader)
        for row, d in zip(batch["input_ids"].numpy(), loader.last_sources):
            counts[d] += 1
            content = row[row != EOD]
            assert ((content >= bases[d]) & (content < bases[d] + 100_000)).all()  # the row is from dataset d
        assert np.abs(counts - target * counts.sum()).max() <= 1.0, (step, counts)
    assert counts[3] == 0 and loader.phase == 0


def test_blend_counts_restart_at_a_phase_switch(tmp_path):
    a, b = two_datasets(tmp_path)
    loader = PretrainLoader(
        [Phase({a: 0.5, b: 0.5}, until=160), Phase({a: 0.1, b: 0.9})], seq_len=8, batch_size=2, val_fraction=0.0
    )
    take(loader, 10)  # phase 1: 10 samples from each
    counts = np.zeros(2)
    for _ in range(30):
        next(loader)
        counts += np.bincount(loader.last_sources, minlength=2)
        assert np.abs(counts - np.array([0.1, 0.9]) * counts.sum()).max() <= 1.0  # phase 2's shares from its start


def test_single_dataset_given_as_a_mapping_or_a_path_is_the_same(tmp_path):
    path = write_prepared(tmp_path / "d", random_docs(10, 0))
    a = PretrainLoader(path, seq_len=8, batch_size=2, val_fraction=0.0)
    b = PretrainLoader({str(path): 3.0}, seq_len=8, batch_size=2, val_fraction=0.0)
    assert_batches_equal(take(a, 6), take(b, 6))


# -------------------------------------------------------------------------------------------------- curriculum
def two_datasets(tmp_path):
    return (
        write_prepared(tmp_path / "a", random_docs(12, 0, base=1)),
        write_prepared(tmp_path / "b", random_docs(12, 1, base=100_000)),
    )


@pytest.mark.parametrize(
    ("until", "total_tokens", "first_phase2_batch"),
    [(160, None, 10), (0.5, 320, 10), (170, None, 11)],  # 16 tokens a batch; 170 is not a batch boundary
)
def test_curriculum_switches_at_the_token_count(tmp_path, until, total_tokens, first_phase2_batch):
    a, b = two_datasets(tmp_path)
    phases = [{"datasets": {a: 1.0}, "until": until}, {"datasets": {a: 0.0, b: 1.0}}]
    loader = PretrainLoader(phases, seq_len=8, batch_size=2, total_tokens=total_tokens, val_fraction=0.0)
    assert loader.phase_starts == [0, 16 * first_phase2_batch if until != 170 else 170]
    for step in range(first_phase2_batch + 5):
        before = loader.tokens_served
        batch = next(loader)
        expected = 0 if step < first_phase2_batch else 1
        assert loader.phase == expected and loader.phase_at(before) == expected
        assert loader.last_sources == [expected] * 2
        content = batch["input_ids"][batch["input_ids"] != EOD]
        assert ((content >= 100_000) == bool(expected)).all()


def test_a_dataset_in_both_phases_continues_its_stream(tmp_path):
    a, b = two_datasets(tmp_path)
    plain = PretrainLoader(a, seq_len=8, batch_size=1, val_fraction=0.0)
    phased = PretrainLoader(
        [Phase({a: 1.0}, until=40), Phase({b: 1.0, a: 1.0})], seq_len=8, batch_size=1, val_fraction=0.0
    )
    from_a = []
    for _ in range(15):
        batch = next(phased)
        if phased.last_sources == [0]:
            from_a.append(batch)
    assert len(from_a) > 5
    assert_batches_equal(from_a, take(plain, len(from_a)))


# ------------------------------------------------------------------------------------------- resume, determinism
def resume_scenario(tmp_path):
    a, b = two_datasets(tmp_path)
    c = write_prepared(tmp_path / "c", random_docs(5, 2, base=200_000))
    phases = [Phase({a: 0.6, b: 0.4}, until=0.5), Phase({b: 0.2, c: 0.8, a: 0.0})]
    return dict(data=phases, seq_len=8, batch_size=3, seed=7, total_tokens=1200, val_fraction=0.2)


def test_resume_reproduces_the_next_batches_across_epochs_and_the_phase_switch(tmp_path):
    kwargs = resume_scenario(tmp_path)
    reference = PretrainLoader(**kwargs)
    states, batches = [], []
    for _ in range(40):
        states.append(json.loads(json.dumps(reference.state_dict())))  # plain JSON data, round-tripped
        batches.append(next(reference))
    epochs = [[s["epoch"] for s in st["streams"]] for st in (states[5], states[-1])]
    assert all(e1 > e0 for e0, e1 in zip(*epochs))  # every stream crossed an epoch boundary after step 5
    assert states[20]["phase"] == 0 and states[30]["phase"] == 1
    for k in (0, 5, 13, 22, 23, 24, 31):  # 600 tokens = phase 2 starts at batch 25 (24 tokens a batch)
        restored = PretrainLoader(**kwargs)
        restored.load_state_dict(states[k])
        assert_batches_equal(take(restored, 40 - k), batches[k:])
        assert restored.state_dict() == reference.state_dict()


def test_resume_with_partial_document_offset(tmp_path):
    path = write_prepared(tmp_path / "d", make_docs([30, 2, 40]))  # long documents: cut mid-document
    kwargs = dict(data=path, seq_len=7, batch_size=1, val_fraction=0.0)
    reference = PretrainLoader(**kwargs)
    take(reference, 3)
    state = reference.state_dict()
    assert state["streams"][0]["offset"] > 0
    restored = PretrainLoader(**kwargs)
    restored.load_state_dict(state)
    assert_batches_equal(take(restored, 10), take(reference, 10))


def test_deterministic_for_a_seed_and_different_across_seeds(tmp_path):
    kwargs = resume_scenario(tmp_path)
    first = take(PretrainLoader(**kwargs), 10)
    assert_batches_equal(first, take(PretrainLoader(**kwargs), 10))
    other = take(PretrainLoader(**{**kwargs, "seed": 8}), 10)
    assert any(not torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(first, other))


# -------------------------------------------------------------------------------------------------- validation
def test_validation_split_is_disjoint_stable_and_survives_appended_shards(tmp_path):
    docs = random_docs(300, seed=3)
    ds = TokenDataset(write_prepared(tmp_path / "d", docs, [100, 200]), val_fraction=0.1)
    train, val = ds.documents("train"), ds.documents("val")
    assert not set(train) & set(val) and sorted([*train, *val]) == list(range(300))
    assert 15 <= len(val) <= 45
    assert ds.num_tokens("train") + ds.num_tokens("val") == ds.num_tokens_total
    again = TokenDataset(tmp_path / "d", val_fraction=0.1)
    assert np.array_equal(again.documents("val"), val)
    assert not np.array_equal(TokenDataset(tmp_path / "d", val_fraction=0.1, seed=1).documents("val"), val)
    grown = TokenDataset(write_prepared(tmp_path / "g", docs + random_docs(50, 4, 10**5), [100, 200, 50]), 0.1)
    assert np.array_equal(grown.documents("val")[grown.documents("val") < 300], val)
    assert np.array_equal(is_validation(np.arange(300), 0.1), np.isin(np.arange(300), val))


def test_validation_iterator_is_one_deterministic_pass_over_held_out_tokens(tmp_path):
    a, b = two_datasets(tmp_path)
    loader = PretrainLoader({a: 1.0, b: 1.0}, seq_len=8, batch_size=3, val_fraction=0.4)
    passes = [list(loader.val_batches()), list(loader.val_batches())]
    assert_batches_equal(*passes)
    batches = passes[0]
    expected = [tok for ds in loader.datasets for i in ds.documents("val") for tok in ds.document(int(i)).tolist()]
    labels = torch.cat([x["labels"].reshape(-1) for x in batches])
    inputs = torch.cat([x["input_ids"].reshape(-1) for x in batches])
    assert labels[labels != -100].tolist() == expected  # every held-out token once, in a fixed order
    assert (inputs[labels == -100] == EOD).all() and (labels[len(expected) :] == -100).all()
    assert all(x["input_ids"].shape == (3, 8) for x in batches[:-1]) and batches[-1]["input_ids"].shape[1] == 8
    for x in batches:
        ids, doc_ids = x["input_ids"].numpy(), x["document_ids"].numpy()
        real = x["labels"].numpy() != -100
        assert np.array_equal(doc_ids[real], document_ids_from_eod(ids, EOD)[real])
        assert all((d[~r] > d[r].max(initial=-1)).all() for d, r in zip(doc_ids, real))  # padding: own document
    only_b = list(loader.val_batches(dataset=b))
    assert only_b and all(((x["input_ids"] == EOD) | (x["input_ids"] >= 100_000)).all() for x in only_b)
    assert_batches_equal(list(loader.val_batches(max_batches=1)), batches[:1])
    next(loader)  # training does not disturb the validation pass
    assert_batches_equal(list(loader.val_batches()), batches)


# ------------------------------------------------------------------------------------------------------ errors
def test_errors(tmp_path):
    good = write_prepared(tmp_path / "good", random_docs(10, 0))
    kw = dict(seq_len=8, batch_size=2, val_fraction=0.0)
    with pytest.raises(ValueError, match="seq_len"):
        PretrainLoader(good, seq_len=1, batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        PretrainLoader(good, seq_len=8, batch_size=0)
    with pytest.raises(FileNotFoundError, match="hybridmoe prepare"):
        PretrainLoader(tmp_path / "nowhere", **kw)
    with pytest.raises(ValueError, match=">= 0"):
        PretrainLoader({good: -1.0}, **kw)
    with pytest.raises(ValueError, match="at least one weight"):
        PretrainLoader({good: 0.0}, **kw)
    with pytest.raises(ValueError, match="total_tokens"):
        PretrainLoader([Phase({good: 1}, until=0.5), Phase({good: 1})], **kw)
    with pytest.raises(ValueError, match="last phase"):
        PretrainLoader([Phase({good: 1}, until=10), Phase({good: 1}, until=20)], **kw)
    with pytest.raises(ValueError, match="increase"):
        PretrainLoader([Phase({good: 1}, until=10), Phase({good: 1}, until=5), Phase({good: 1})], **kw)
    with pytest.raises(ValueError, match="no train documents"):
        PretrainLoader(good, seq_len=8, batch_size=2, val_fraction=1.0)
    with pytest.raises(ValueError, match="no validation documents"):
        PretrainLoader(good, **kw).val_batches()
    other_tok = write_prepared(tmp_path / "other", random_docs(4, 1), eod=1)
    with pytest.raises(ValueError, match="different tokenizers"):
        PretrainLoader({good: 1, other_tok: 1}, **kw)

    def broken(name, edit):
        path = write_prepared(tmp_path / name, random_docs(10, 0), [4, 6])
        edit(path)
        return path

    manifest = lambda p: json.loads((p / "manifest.json").read_text())  # noqa: E731
    bad_format = broken("fmt", lambda p: (p / "manifest.json").write_text(json.dumps({**manifest(p), "format": "x"})))
    with pytest.raises(ValueError, match="format 'x'"):
        TokenDataset(bad_format)
    with pytest.raises(ValueError, match=r"shard-00001\.bin holds"):
        TokenDataset(broken("short", lambda p: (p / "shard-00001.bin").write_bytes(b"\0" * 4)))
    with pytest.raises(ValueError, match=r"shard-00000\.idx is missing"):
        TokenDataset(broken("missing", lambda p: (p / "shard-00000.idx").unlink()))

    no_eod = write_prepared(tmp_path / "noeod", [[5, 6, 7]])
    (no_eod / "shard-00000.bin").write_bytes(np.array([5, 6, 7, 8], "<u4").tobytes())  # last token is not eod
    with pytest.raises(ValueError, match="corrupt or changed"):
        PretrainLoader(no_eod, **kw)
    with pytest.raises(ValueError, match="not eod"):  # unverified, the damage is still caught as it is read
        next(PretrainLoader(no_eod, **kw, verify=False))

    state = PretrainLoader(good, seed=1, **kw).state_dict()
    with pytest.raises(ValueError, match="seed"):
        PretrainLoader(good, seed=2, **kw).load_state_dict(state)
    with pytest.raises(ValueError, match="datasets"):
        PretrainLoader(good, seed=1, seq_len=8, batch_size=2, val_fraction=0.5).load_state_dict(state)


def test_batches_feed_the_model(tmp_path):
    from hybridmoe import HybridMoEConfig, HybridMoEForCausalLM

    docs = [list(np.random.default_rng(k).integers(1, 512, size=n)) for k, n in enumerate([5, 20, 3, 9, 14])]
    path = write_prepared(tmp_path / "d", docs, dtype="uint16", vocab=512)
    loader = PretrainLoader(path, seq_len=16, batch_size=2, val_fraction=0.5, split_seed=1)
    torch.manual_seed(0)
    model = HybridMoEForCausalLM(HybridMoEConfig.from_preset("debug"))
    with torch.no_grad():
        for batch in (next(loader), next(loader.val_batches())):
            assert torch.isfinite(model(**batch, return_logits=False).loss)


# ------------------------------------------------------------------------------------------ shard checksums
def _flip_a_byte(path: Path) -> None:
    """Change one byte in place: the size stays, so only the checksum can tell."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_shards_are_verified_against_the_manifest_sha256(tmp_path):
    path = write_prepared(tmp_path / "d", random_docs(10, 0), [4, 6])
    TokenDataset(path)
    _flip_a_byte(path / "shard-00001.bin")
    with pytest.raises(ValueError, match=r"corrupt or changed.*shard-00001\.bin: sha256 .*--no-verify"):
        TokenDataset(path)
    with pytest.raises(ValueError, match=r"shard-00001\.bin: sha256"):
        PretrainLoader(path, seq_len=8, batch_size=2, val_fraction=0.0)
    assert TokenDataset(path, verify=False).num_documents == 10
    next(PretrainLoader(path, seq_len=8, batch_size=2, val_fraction=0.0, verify=False))

    manifest = json.loads((path / "manifest.json").read_text())
    del manifest["shards"][0]["sha256"]
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"shard-00000 has no sha256"):
        TokenDataset(path)


def test_a_directory_is_verified_once_per_process(tmp_path, monkeypatch):
    import hybridmoe.data.loader as loader_module

    hashed = []
    sha256_file = loader_module.sha256_file
    monkeypatch.setattr(loader_module, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or sha256_file(p, *a))
    path = write_prepared(tmp_path / "d", random_docs(10, 0), [4, 6])
    TokenDataset(path)
    PretrainLoader({path: 1.0}, seq_len=8, batch_size=2, val_fraction=0.0)
    assert sorted(hashed) == ["shard-00000.bin", "shard-00000.idx", "shard-00001.bin", "shard-00001.idx"]
    _flip_a_byte(path / "shard-00000.bin")  # a file that changed since is hashed again
    with pytest.raises(ValueError, match=r"shard-00000\.bin: sha256"):
        TokenDataset(path)
    assert len(hashed) == 5


def test_recipe_data_verify_reaches_the_loader(tmp_path):
    from types import SimpleNamespace

    from helpers import VOCAB

    from hybridmoe.train.config import Recipe
    from hybridmoe.train.data import Streams

    path = write_prepared(tmp_path / "d", random_docs(10, 0))
    _flip_a_byte(path / "shard-00000.bin")

    def recipe(**data):
        data = {"phases": [{"datasets": {str(path): 1.0}}], "seq_len": 8, "batch_size": 2, "val_fraction": 0, **data}
        return Recipe.from_dict({"data": data, "train": {"steps": 2}})

    assert recipe().data.verify is True
    with pytest.raises(ValueError, match="sha256"):
        Streams(recipe(), SimpleNamespace(vocab_size=VOCAB))
    Streams(recipe(verify=False), SimpleNamespace(vocab_size=VOCAB))


def test_eval_ppl_no_verify_flag(monkeypatch, tmp_path):
    import hybridmoe.eval.perplexity as perplexity
    from hybridmoe.cli import main

    calls = []

    def fake(*args, **kwargs):
        calls.append(kwargs["verify"])
        return {"perplexity": 1.0, "loss": 0.0, "bits_per_byte": None, "target_tokens": 1, "windows": 1,
                "seq_len": 8, "out": "x"}  # fmt: skip

    monkeypatch.setattr(perplexity, "evaluate_perplexity", fake)
    assert main(["eval", "ppl", str(tmp_path), str(tmp_path)]) == 0
    assert main(["eval", "ppl", str(tmp_path), str(tmp_path), "--no-verify"]) == 0
    assert calls == [True, False]
