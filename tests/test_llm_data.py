"""Text data: sources, the document-level split, the token cache and packed batches."""

import json
import random

import numpy as np
import pytest

from llm.corpus import generate_corpus
from llm.data import PackedBatches, TextDataConfig, load_documents, prepare_data, split_documents, validation_rows
from shared.errors import UserError


def test_document_split_has_no_overlap_and_ignores_order():
    docs = generate_corpus(800, seed=3)
    train, val = split_documents(docs, 0.05)
    assert not set(train) & set(val)
    assert len(train) + len(val) == len(docs) and 10 < len(val) < 80
    shuffled = docs[:]
    random.Random(0).shuffle(shuffled)
    assert set(split_documents(shuffled, 0.05)[1]) == set(val)  # fixed validation set
    assert set(split_documents(docs[:400], 0.05)[1]) == set(val) & set(docs[:400])  # and prefix-stable


def test_local_txt_jsonl_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("first document")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text(json.dumps({"text": "second"}) + "\n" + json.dumps({"text": "third"}) + "\n")
    pq.write_table(pa.table({"text": ["fourth", "fifth"]}), tmp_path / "sub" / "c.parquet")
    docs, desc = load_documents(TextDataConfig(source=str(tmp_path)))
    assert docs == ["first document", "second", "third", "fourth", "fifth"] and "local files" in desc
    with pytest.raises(UserError, match="not found"):
        load_documents(TextDataConfig(source=str(tmp_path / "missing")))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(UserError, match="bad.jsonl:1"):
        load_documents(TextDataConfig(source=str(tmp_path / "bad.jsonl")))


def small_cfg(tmp_path, **kw) -> TextDataConfig:
    base = dict(source="builtin", builtin_docs=300, tokenizer="bpe:400", seq_len=32, val_fraction=0.05,
                cache_dir=str(tmp_path / "tokens"))
    return TextDataConfig(**{**base, **kw})


def test_token_cache_round_trips_and_refuses_a_mismatch(tmp_path):
    cache = prepare_data(small_cfg(tmp_path), log=lambda *_: None)
    tok = cache.tokenizer
    train, val = cache.tokens("train"), cache.tokens("val")
    assert cache.meta["train_tokens"] == len(train) and train.dtype == np.uint16
    assert cache.meta["val_tokens"] == len(val) > 0
    starts = cache.doc_starts("train")
    assert starts[0] == 0 and all(train[s - 1] == tok.eos_id for s in starts[1:])  # boundaries are EOS
    docs, _ = load_documents(small_cfg(tmp_path))
    first_train = split_documents(docs, 0.05)[0][0]
    assert tok.decode(list(train[: starts[1] - 1])) == first_train
    again = prepare_data(small_cfg(tmp_path), log=lambda *_: None)  # reused, not rebuilt
    assert again.dir == cache.dir and again.tokenizer.fingerprint == tok.fingerprint
    with pytest.raises(UserError, match="tokenizer"):
        prepare_data(small_cfg(tmp_path, tokenizer="bpe:300"), log=lambda *_: None)
    with pytest.raises(UserError, match="seq_len 32"):
        prepare_data(small_cfg(tmp_path, seq_len=64), log=lambda *_: None)


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
