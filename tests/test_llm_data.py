"""Text data: sources, the document-level split, the token cache and packed batches."""

import json
import random

import numpy as np
import pytest

from llm.corpus import generate_corpus
from llm import sources
from llm.data import PackedBatches, TextDataConfig, prepare_data, validation_rows
from llm.sources import is_validation, iter_pieces
from shared.errors import UserError


def test_validation_split_by_hash_ignores_order_and_prefix():
    docs = generate_corpus(800, seed=3)
    val = {d for d in docs if is_validation(d, 0.05)}
    assert 10 < len(val) < 80
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    assert {d for d in shuffled if is_validation(d, 0.05)} == val  # fixed whatever the order


def pieces(source: str) -> list:
    return list(iter_pieces(source, "text", 0))


def test_local_txt_jsonl_and_parquet_sources_stream(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n" + json.dumps({"text": "third"}) + "\n")
    pq.write_table(pa.table({"text": ["fourth", "fifth"]}), tmp_path / "sub" / "c.parquet")
    assert [p[0] for p in pieces(str(tmp_path))] == ["first document", "second", "third", "fourth", "fifth"]
    with pytest.raises(UserError, match="not found"):
        pieces(str(tmp_path / "missing"))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="bad.jsonl:1"):
        pieces(str(tmp_path / "bad.jsonl"))
    # a large .txt file is one document read in pieces cut at line ends
    monkeypatch.setattr(sources, "PIECE_CHARS", 50)
    text = "".join(f"line {i} of a long book\n" for i in range(40))
    (tmp_path / "book.txt").write_text(text)
    parts = pieces(str(tmp_path / "book.txt"))
    assert len(parts) > 5 and "".join(p[0] for p in parts) == text and all(p[0].endswith("\n") for p in parts)
    assert [p[1] for p in parts] == [True] + [False] * (len(parts) - 1)
    assert [p[2] for p in parts] == [False] * (len(parts) - 1) + [True]


def test_source_identities_keep_the_values_that_name_existing_caches(tmp_path):
    assert sources.source_identity("builtin", "text", 6000) == {"source": "builtin", "builtin_docs": 6000}
    hub = sources.source_identity("hf:owner/name:config", "body", 0, skip_undecodable=True)
    assert hub == {"source": "hf:owner/name:config", "text_field": "body"}
    (tmp_path / "a.txt").write_text("some text")
    st = (tmp_path / "a.txt").stat()
    local = {"source": str(tmp_path.resolve()), "text_field": "text", "files": [["a.txt", st.st_size, st.st_mtime_ns]],
             "text_check": 1}
    assert sources.source_identity(str(tmp_path), "text", 0) == local
    assert sources.source_identity(str(tmp_path / "a.txt"), "text", 0)["files"] == [["a.txt", st.st_size, st.st_mtime_ns]]
    assert sources.source_identity(str(tmp_path), "text", 0, skip_undecodable=True) == {**local, "skip_undecodable": True}


def small_cfg(tmp_path, **kw) -> TextDataConfig:
    base = dict(source="builtin", builtin_docs=300, tokenizer="bpe:400", seq_len=32, val_fraction=0.05,
                cache_dir=str(tmp_path / "tokens"))
    return TextDataConfig(**{**base, **kw})


def quiet(*_):
    pass


def test_token_cache_round_trips_and_refuses_a_mismatch(tmp_path):
    cache = prepare_data(small_cfg(tmp_path), log=quiet)
    tok = cache.tokenizer
    train, val = cache.tokens("train"), cache.tokens("val")
    assert cache.meta["train_tokens"] == len(train) and train.dtype == np.uint16
    assert cache.meta["val_tokens"] == len(val) > 0
    docs = generate_corpus(300)
    train_docs = [d for d in docs if not is_validation(d, 0.05)]
    ends = np.flatnonzero(np.asarray(train) == tok.eos_id)
    assert len(ends) == len(train_docs) == cache.meta["train_docs"]  # one EOS closes every document
    assert tok.decode(list(train[: ends[0]])) == train_docs[0]
    again = prepare_data(small_cfg(tmp_path), log=quiet)  # reused, not rebuilt
    assert again.dir == cache.dir and again.tokenizer.fingerprint == tok.fingerprint
    with pytest.raises(UserError, match="tokenizer"):
        prepare_data(small_cfg(tmp_path, tokenizer="bpe:300"), log=quiet)
    with pytest.raises(UserError, match="other data"):
        prepare_data(small_cfg(tmp_path, val_fraction=0.1), log=quiet)
    assert prepare_data(small_cfg(tmp_path, seq_len=64), log=quiet).dir == cache.dir  # seq_len is not the data


def test_cache_identity_is_what_was_read(tmp_path, monkeypatch):
    monkeypatch.setenv("BLUEBERRY_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = generate_corpus(400, seed=5)
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = dict(source=str(corpus), builtin_docs=0, tokenizer="bpe:400", val_fraction=0.05, val_tokens=200)
    logs = []
    short = prepare_data(TextDataConfig(**cfg, max_tokens=3000), log=logs.append)
    assert not short.meta["complete"] and 3000 <= short.meta["train_tokens"] < 20_000
    assert short.meta["val_tokens"] >= 201 and len(short.tokens("train")) == 3000
    first = np.array(short.tokens("train"))
    full = prepare_data(TextDataConfig(**cfg, max_tokens=20_000), log=logs.append)  # too short: read further
    assert full.dir == short.dir and full.meta["train_tokens"] >= 20_000 and "further" in " ".join(map(str, logs))
    assert np.array_equal(np.array(full.tokens("train")[:3000]), first)  # a longer read starts the same
    assert np.array_equal(np.array(full.tokens("val")), np.array(short.tokens("val")))  # and validates alike
    n = len(logs)
    again = prepare_data(TextDataConfig(**cfg, max_tokens=3000), log=logs.append)  # the longer cache serves it
    assert len(logs) == n and np.array_equal(np.array(again.tokens("train")), first)
    (corpus / "a.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs[::-1]))
    changed = prepare_data(TextDataConfig(**cfg, max_tokens=3000), log=logs.append)  # an edited file is read again
    assert changed.dir != short.dir and not np.array_equal(np.array(changed.tokens("train")), first)


def test_packed_batches_are_deterministic_and_resumable():
    tokens = np.arange(10_000, dtype=np.uint16)
    a = PackedBatches(tokens, 16, 4, seed=1)
    x, y = a.next_batch()
    assert x.shape == (4, 16) and np.array_equal(x[:, 1:].numpy(), y[:, :-1].numpy())
    seen = [a.next_batch()[0] for _ in range(200)]  # crosses an epoch (624 rows / 4)
    state = a.state_dict()
    expected = [a.next_batch()[0] for _ in range(5)]
    b = PackedBatches(tokens, 16, 4, seed=1)
    b.load_state_dict(state)
    assert all(np.array_equal(e, b.next_batch()[0]) for e in expected)
    assert state["epoch"] == 1 and len(seen) == 200
    c = PackedBatches(tokens, 16, 4, seed=2)
    assert not np.array_equal(c.next_batch()[0], PackedBatches(tokens, 16, 4, seed=1).next_batch()[0])


def test_validation_rows_are_fixed_and_refuse_short_splits():
    tokens = np.arange(1000, dtype=np.uint16)
    rows = validation_rows(tokens, 10, 100)
    assert rows.shape == (10, 11) and rows[1, 0] == 10 and rows[0, -1] == 10
    with pytest.raises(UserError, match="fewer than one row"):
        validation_rows(tokens[:5], 10, 100)


def test_hub_errors_keep_their_message(monkeypatch):
    import datasets

    monkeypatch.setattr(sources, "require_hub", lambda *a: None)

    def misspelled(*a, **k):
        raise ValueError("BuilderConfig 'cosmopedia-v3' not found. Available: ['cosmopedia-v2', 'fineweb-edu-dedup']")

    monkeypatch.setattr(datasets, "load_dataset", misspelled)
    with pytest.raises(UserError, match="cosmopedia-v3' not found. Available") as e:
        pieces("hf:HuggingFaceTB/smollm-corpus:cosmopedia-v3")
    assert "offline" not in str(e.value) and "--data builtin" not in str(e.value)

    def dropped(*a, **k):
        raise ConnectionError("Connection reset by peer")

    monkeypatch.setattr(datasets, "load_dataset", dropped)
    with pytest.raises(UserError, match="lost the connection.*--data builtin"):
        pieces("hf:owner/name")
