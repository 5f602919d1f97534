"""Pre-tokenised data: rows of token ids read as stored (TokenRowsSource in llm/sources.py), checked
against the tokenizer, and cached once as one memory-mapped [rows, seq_len + 1] array. A row is
trained and evaluated whole (inputs row[:-1], targets row[1:]), never packed with the next. Two
splits of the rows (`data.split`):

  hash              Blueberry's: a row validates when a hash of its ids falls below val_fraction;
                    the first val_rows such rows are evaluated and later ones left out (never
                    trained on); the training rows are drawn epoch by epoch (EpochOrder, train.seed).
  train_test_split  5-dollar-llm's (Open-Superintelligence-Lab/5-dollar-llm at 4ba324f,
                    train_llm.py): datasets' `train_test_split(test_size=val_fraction,
                    seed=split_seed)` of the first `rows` rows; training draws the train part in
                    the order of their `DataLoader(shuffle=True, batch_size, num_workers=2,
                    persistent_workers=True, generator=Generator().manual_seed(order_seed))` after
                    their compile warm-up; validation is the first val_rows rows of the test part
                    in order (their first 100 batches of 8).

Both are reproduced without `datasets` (the GPU machine has none): the split is the numpy
permutation datasets draws, the order replays what torch's RandomSampler and DataLoader draw from
the shared generator. tests/test_llm_pretokenized.py checks both against the real calls.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from shared.cache import Stale, build_once, cache_root, check_folder
from shared.contracts import BatchSource
from shared.epochs import EpochOrder
from shared.errors import UserError

from .data import (
    TextData,
    TextDataConfig,
    _key,
    _rebuildable,
    _refuse_foreign,
    _slug,
    content_hash,
    read_meta_json,
)
from .sources import TokenRowsSource, open_source
from .tokenizer import TextTokenizer, load_tokenizer

CACHE_VERSION = 1
ROW_GROUP = 1024  # rows written at a time by write_rows_dataset
META_KEYS = ("identity", "identity_key", "tokenizer", "tokenizer_fingerprint", "dtype", "row_len", "rows", "complete")


def _print(*args) -> None:
    print(*args, flush=True)


def wanted_rows(cfg: TextDataConfig, budget: int) -> int:
    """Rows a run reads (0 = all): data.rows, or every row for a budget above data.all_rows_above
    (5-dollar-llm trains 8M and 20M on train[:20000] and 100M and 1B on the whole set)."""
    return 0 if cfg.all_rows_above and budget > cfg.all_rows_above else cfg.rows


# ---------------------------------------------------------------------------------- the cache


@dataclass
class RowCache:
    dir: Path
    meta: dict
    tokenizer: TextTokenizer
    description: str
    rows: np.ndarray  # [n, row_len], memory-mapped
    hashes: np.ndarray  # [n] uint64: what the hash split reads


def _row_hashes(rows: np.ndarray) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "big") for r in rows],
                    dtype=np.uint64)


def _check_ids(rows: np.ndarray, first: int, tok: TextTokenizer, spec: str) -> None:
    """Every id a token of the tokenizer: rows made by another tokenizer are refused, not trained on."""
    lo, hi = int(rows.min()), int(rows.max())
    if lo >= 0 and hi < tok.vocab_size:
        return
    bad = lo if lo < 0 else hi
    row = first + int(np.flatnonzero((rows == bad).any(1))[0])
    if bad < 0:
        raise UserError(f"row {row:,} of {spec} holds the token id {bad}: ids are never negative")
    raise UserError(f"row {row:,} of {spec} holds the token id {bad:,}, past the {tok.vocab_size:,} tokens of "
                    f"tokenizer {tok.spec!r}: the rows were made with another tokenizer; set data.tokenizer to it")


def _write_rows(tmp: Path, source: TokenRowsSource, tok: TextTokenizer, length: int, need: int, log: Callable) -> dict:
    """Stream the source's rows into tmp/rows.bin (and their hashes into tmp/hash.bin), checking each
    row's length and ids, up to `need` rows (0 = all)."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    n, complete, last_log = 0, True, time.monotonic()
    with open(tmp / "rows.bin", "wb") as rows_file, open(tmp / "hash.bin", "wb") as hash_file:
        for lengths, ids in source.rows():
            keep = len(lengths) if not need else min(len(lengths), need - n)
            wrong = np.flatnonzero(lengths[:keep] != length)
            if wrong.size:
                i = int(wrong[0])
                raise UserError(f"row {n + i:,} of {source.spec} holds {int(lengths[i]):,} ids; this config reads rows of "
                                f"data.seq_len + 1 = {length:,} (rows of 2,048 ids need data.seq_len = 2047)")
            rows = ids[:keep * length].reshape(keep, length)
            if keep:
                _check_ids(rows, n, tok, source.spec)
                rows = rows.astype(dtype)
                rows_file.write(rows.tobytes())
                hash_file.write(_row_hashes(rows).tobytes())
            n += keep
            if need and n >= need:
                complete = False  # the source may hold more: a run that wants more reads it again, further
                break
            if time.monotonic() - last_log > 15:
                log(f"  read {n:,} rows so far")
                last_log = time.monotonic()
    if n == 0:
        raise UserError(f"{source.spec} holds no rows")
    return {"dtype": np.dtype(dtype).name, "row_len": length, "rows": n, "complete": complete}


def _damage(meta: dict, where: Path) -> str:
    """What is wrong with a row cache's files against its meta.json ("" = nothing)."""
    if meta.get("version") != CACHE_VERSION:
        return f"format version {meta.get('version')}, this code reads {CACHE_VERSION}"
    if missing := [k for k in META_KEYS if k not in meta]:
        return f"its meta.json lacks {', '.join(missing)}"
    if meta["dtype"] not in ("uint16", "uint32"):
        return f"its meta.json names the dtype {meta['dtype']!r}"
    try:
        n, length = int(meta["rows"]), int(meta["row_len"])
        for name, want in (("rows.bin", n * length * np.dtype(meta["dtype"]).itemsize), ("hash.bin", n * 8)):
            if (have := (where / name).stat().st_size) < want:
                return f"{name} holds {have:,} bytes, its meta.json promises {want:,}"
    except FileNotFoundError as e:
        return f"{Path(e.filename).name} is missing"
    except (TypeError, ValueError) as e:
        return f"its meta.json is garbled ({e})"
    return ""


def _read_meta(where: Path, tok: TextTokenizer, identity_key: str, need: int, own: bool) -> dict | None:
    meta = read_meta_json(where, own)
    if meta is None:
        return None
    if damage := _damage(meta, where):
        raise _rebuildable(where, own, damage)
    if meta["tokenizer_fingerprint"] != tok.fingerprint or meta["identity_key"] != identity_key:
        if own:
            raise Stale(f"the row cache {where} holds other rows or another tokenizer's: reading them again")
        raise UserError(f"data.cache_dir {where} holds rows of {meta['identity']['source']!r} with tokenizer "
                        f"{meta['tokenizer']!r}, not this run's: delete it or choose another data.cache_dir")
    if not (meta["complete"] or (need and meta["rows"] >= need)):
        _refuse_foreign(where, own, f"it holds {meta['rows']:,} rows, this run reads {f'{need:,}' if need else 'all'}")
        raise Stale(f"the row cache {where} holds {meta['rows']:,} rows, this run reads more: reading the source again")
    return meta


def prepare_rows(cfg: TextDataConfig, need: int, check: Callable[[int, np.ndarray], object] = lambda n, h: None,
                 log: Callable = _print) -> RowCache:
    """The row cache of a pre-tokenised source, built once (as prepare_data builds a token cache):
    named by the source and the tokenizer, not by how many rows a run reads, so a cache of every
    row serves a run of 20,000. `check(rows, hashes)` runs on a fresh build before it is kept: a
    split that cannot work leaves nothing behind."""
    if cfg.tokenizer.startswith("bpe:"):
        raise UserError(f"data.tokenizer {cfg.tokenizer!r} trains a tokenizer on text, but {cfg.source} holds token ids "
                        "already: name the tokenizer that made them (5-dollar-llm's: HuggingFaceTB/SmolLM2-135M)")
    source = open_source(cfg.source, cfg.text_field, cfg.builtin_docs, ids_field=cfg.ids_field)
    length = cfg.seq_len + 1
    identity = source.identity()
    identity_key = _key(identity, length)
    tok = load_tokenizer(cfg.tokenizer)
    own = not cfg.cache_dir
    where = (cache_root() / "tokens" / f"{_slug(cfg.source)}-rows-{_key(identity_key, tok.fingerprint)}" if own
             else check_folder(Path(cfg.cache_dir).expanduser(), f"data.cache_dir {cfg.cache_dir}"))

    def read() -> RowCache | None:
        meta = _read_meta(where, tok, identity_key, need, own)
        if meta is None:
            return None
        n = meta["rows"] if not need else min(need, meta["rows"])
        rows = np.memmap(where / "rows.bin", dtype=meta["dtype"], mode="r", shape=(meta["rows"], length))[:n]
        hashes = np.memmap(where / "hash.bin", dtype=np.uint64, mode="r", shape=(meta["rows"],))[:n]
        return RowCache(where, meta, tok, f"{source.describe()} [row cache {where}]", rows, hashes)

    def build(tmp: Path) -> None:
        log(f"reading {source.describe()} into {where} (rows of {length:,} ids, checked against {tok.spec}"
            + (f", the first {need:,} rows" if need else "") + ") ...")
        tmp.mkdir(parents=True)
        meta = {"version": CACHE_VERSION, "identity": identity, "identity_key": identity_key, "tokenizer": tok.spec,
                "tokenizer_fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size,
                **_write_rows(tmp, source, tok, length, need, log)}
        check(meta["rows"], np.fromfile(tmp / "hash.bin", dtype=np.uint64))
        tok.save(tmp / "tokenizer.json")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))  # last: a folder with meta.json is whole

    return build_once(where, read, build, "the row cache", log)


# ---------------------------------------------------------------------------------- splits


def train_test_split_indices(n: int, test_size: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) row indices as datasets' `Dataset.train_test_split(test_size=..., seed=...)`
    chooses them: ceil(test_size * n) test rows, both parts in the order of one permutation drawn
    by numpy's default_rng(seed)."""
    n_test = math.ceil(test_size * n)
    if not 0 < n_test < n:
        raise UserError(f"train_test_split of {n:,} rows at test_size {test_size:g} leaves an empty part")
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_test:], perm[:n_test]


@dataclass
class RowSplit:
    train: np.ndarray  # row indices the training order draws from
    val: np.ndarray  # row indices evaluated, in order
    what: str  # the split in words


def split_rows(n: int, hashes: np.ndarray, cfg: TextDataConfig) -> RowSplit:
    """The rows' split (the module docstring describes both); fewer validation rows than
    data.val_rows is refused."""
    if cfg.split == "train_test_split":
        train, candidates = train_test_split_indices(n, cfg.val_fraction, cfg.split_seed)
        what = (f"train_test_split(test_size={cfg.val_fraction:g}, seed={cfg.split_seed}) of {n:,} rows: "
                f"{len(train):,} train, {len(candidates):,} test")
    else:
        is_val = hashes.astype(np.float64) / 2**64 < cfg.val_fraction
        candidates, train = np.flatnonzero(is_val), np.flatnonzero(~is_val)
        what = f"rows by hash (val_fraction {cfg.val_fraction:g}) of {n:,} rows: {len(train):,} train"
    if len(candidates) < cfg.val_rows:
        raise UserError(f"the {cfg.split} split of {n:,} rows leaves {len(candidates):,} validation rows, fewer than "
                        f"data.val_rows = {cfg.val_rows:,} (5-dollar-llm evaluates 100 batches of 8 rows): read more "
                        "rows (data.rows) or raise data.val_fraction")
    return RowSplit(train, candidates[:cfg.val_rows], f"{what}, validation on {cfg.val_rows:,} rows")


# ---------------------------------------------------------------------------------- order


class LoaderOrder:
    """The rows 5-dollar-llm's training DataLoader hands out, epoch by epoch, as EpochOrder's
    interface hands them (batches of indices into the train part; an epoch's incomplete last batch,
    which their loader trains as a smaller batch, is skipped).

    Their train and validation loaders share one generator (manual_seed(seed)). From it, in order:
    the train iterator's base seed (an int64), the sampler's permutation for the compile warm-up
    (3 batches, the iterator then dropped), the permutation of epoch 0, the validation iterator's
    base seed at the first evaluation (step 0), and at the end of each epoch the permutation
    torch's RandomSampler draws for its empty tail, then the next epoch's. With 2 workers the loader
    has asked for 4 + k batches after k are taken, so a train part of under 7 batches reaches its
    end during the warm-up, and one of under 5 before the first evaluation: both are replayed too."""

    WARMUP_REQUESTS, FIRST_EVAL_REQUESTS = 7, 5  # batches asked for then: 2 workers x prefetch 2, plus those taken

    def __init__(self, n: int, batch_size: int, seed: int):
        if n < batch_size:
            raise UserError(f"{n:,} training rows is fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed)
        base_seed = lambda: torch.empty((), dtype=torch.int64).random_(generator=g)  # noqa: E731
        perm = lambda: torch.randperm(self.n, generator=g)  # noqa: E731
        batches = self.n // self.batch_size + 1  # the request that finds the sampler exhausted
        base_seed()
        perm()  # the warm-up's
        if batches <= self.WARMUP_REQUESTS:
            perm()  # its tail
        order = perm()
        if epoch == 0:
            return order
        if batches <= self.FIRST_EVAL_REQUESTS:
            perm(), base_seed()
        else:
            base_seed(), perm()
        for _ in range(epoch):
            order = perm()
            perm()  # the tail, drawn as the epoch ends
        return order

    def next(self) -> tuple[torch.Tensor, torch.Generator]:
        if self.cursor + self.batch_size > self.n:
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        idx = self._order[self.cursor:self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return idx, torch.Generator().manual_seed(self.seed)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["n"] != self.n or state["seed"] != self.seed:
            raise UserError("the checkpoint's data position does not fit this data (different rows or order seed)")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._order = self._permutation(self.epoch)


class RowBatches(BatchSource):
    """Batches of whole rows of the train part: (row[:, :-1], row[:, 1:]). A batch counts as
    batch_size x row length tokens, as 5-dollar-llm counts them (x.numel()), so an 8M-token budget is
    their ceil(8e6 / 16,384) = 489 steps of 8 x 2048 (their leaderboard's 8,011,776 tokens)."""

    def __init__(self, rows: np.ndarray, train: np.ndarray, batch_size: int, order: EpochOrder | LoaderOrder):
        self.rows, self.train, self.batch_size, self.order = rows, train, batch_size, order
        self.units_per_batch = batch_size * rows.shape[1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx, _ = self.order.next()
        chunk = torch.from_numpy(np.asarray(self.rows[self.train[idx.numpy()]]).astype(np.int64))
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()

    def skip_batch(self) -> None:
        self.order.next()

    def state_dict(self) -> dict:
        return {**self.order.state_dict(), "order": type(self.order).__name__}

    def load_state_dict(self, state: dict) -> None:
        if state.get("order") != type(self.order).__name__:
            raise UserError("the checkpoint's data position does not fit this data (another split or order)")
        self.order.load_state_dict(state)


# ---------------------------------------------------------------------------------- a run's data


def open_rows(cfg: TextDataConfig, batch_size: int, seed: int, budget: int, log: Callable = _print) -> TextData:
    """A pre-tokenised source's training batches and fixed validation rows (llm.data.open_text_data)."""
    need = wanted_rows(cfg, budget)
    cache = prepare_rows(cfg, need, check=lambda n, hashes: split_rows(n, hashes, cfg), log=log)
    n = len(cache.rows)
    split = split_rows(n, cache.hashes, cfg)
    if cfg.split == "train_test_split":
        order, how = LoaderOrder(len(split.train), batch_size, cfg.order_seed), \
            f"5-dollar-llm's DataLoader order (generator seed {cfg.order_seed})"
    else:
        order, how = EpochOrder(len(split.train), batch_size, seed, what="training rows"), f"shuffled (seed {seed})"
    val = torch.from_numpy(np.asarray(cache.rows[split.val]).astype(np.int64))
    tok, length = cache.tokenizer, cache.rows.shape[1]
    lines = [f"data: {cache.description}",
             f"rows: {split.what} ({val.shape[0] * (length - 1):,} predictions); training rows {how}"]
    identity = {"source": cfg.source, "ids_field": cfg.ids_field, "tokenizer": tok.spec,
                "tokenizer_fingerprint": tok.fingerprint, "split": cfg.split, "row_len": length, "rows": n,
                "train_rows": len(split.train), "train_tokens": len(split.train) * length, "val_rows": int(val.shape[0]),
                "val_predictions": int(val.shape[0] * (length - 1)), "sha256": content_hash(cache.rows)}
    return TextData(tok, cache.description, lines, RowBatches(cache.rows, split.train, batch_size, order), val, identity)


# ---------------------------------------------------------------------------------- writing rows


def write_rows_dataset(source: str, tokenizer: str, row_len: int, out: Path, fmt: str = "parquet",
                       text_field: str = "text", seed: int = 42, log: Callable = _print) -> dict:
    """A pre-tokenised dataset in 5-dollar-llm's layout (their data/prepare_mix_data.py) from a
    text source: documents tokenised in order, each closed by end-of-text, concatenated and cut into
    rows of `row_len` ids (the shorter rest dropped), the rows shuffled as datasets' shuffle(seed)
    does (numpy's default_rng(seed).permutation), written as {"input_ids", "labels"} rows (labels
    equal to the ids) into `out`: rows.parquet, or with fmt="disk" a datasets save_to_disk folder;
    beside them tokenizer.json and prep_metadata.json. Rows wait in a temporary file, so memory
    stays bounded; a failure leaves nothing at `out`."""
    from shared.cache import writing

    from .data import BPE_CHARS, FLUSH_CHARS
    from .sources import iter_pieces, source_identity, training_text

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder: give a new folder for the dataset")
    if row_len < 2 or fmt not in ("parquet", "disk"):
        raise UserError(f"rows need at least 2 ids and the format is parquet or disk (got {row_len}, {fmt!r})")
    corpus = _key(source_identity(source, text_field, 6000), 0.0)
    tok = load_tokenizer(tokenizer, lambda: training_text(source, text_field, 6000, 0.0, BPE_CHARS),
                         cache_root() / "tokenizers", corpus)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out.parent}: {e.strerror or e}") from None
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch, \
            writing(out, "the pre-tokenised dataset") as tmp:
        n, docs = _cut_rows(iter_pieces(source, text_field, 6000), tok, row_len, Path(scratch) / "rows", dtype, FLUSH_CHARS)
        if n == 0:
            raise UserError(f"{source} holds fewer than {row_len:,} tokens: no row to write")
        rows = np.memmap(Path(scratch) / "rows", dtype=dtype, mode="r", shape=(n, row_len))
        order = np.random.default_rng(seed).permutation(n)
        if fmt == "parquet":
            tmp.mkdir(parents=True)
            _write_parquet(rows, order, tmp / "rows.parquet")
        else:
            _write_disk(rows, order, tmp, Path(scratch) / "build")
        tok.save(tmp / "tokenizer.json")
        meta = {"max_seq_len": row_len, "rows": n, "tokens": n * row_len, "documents": docs, "source": source,
                "tokenizer_name": tok.spec, "tokenizer_fingerprint": tok.fingerprint, "shuffle_seed": seed}
        (tmp / "prep_metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    log(f"wrote {n:,} rows of {row_len:,} ids ({docs:,} documents, tokenizer {tok.spec}) to {out}")
    return meta


def _cut_rows(pieces, tok: TextTokenizer, row_len: int, path: Path, dtype, flush_chars: int) -> tuple[int, int]:
    """Tokenise the pieces in order into rows of row_len ids appended to `path`: (rows, documents)."""
    rows = docs = 0
    carry = np.zeros(0, dtype=np.int64)
    batch: list[tuple[str, bool]] = []
    with open(path, "wb") as f:
        def flush() -> None:
            nonlocal carry, rows
            ids = [np.asarray(t + [tok.eos_id] * last, dtype=np.int64)
                   for t, (_, last) in zip(tok.encode_batch_ids([p for p, _ in batch]), batch)]
            carry = np.concatenate([carry, *ids])
            whole = len(carry) // row_len * row_len
            f.write(carry[:whole].astype(dtype).tobytes())
            rows += whole // row_len
            carry = carry[whole:]
            batch.clear()

        chars = 0
        for text, first, last in pieces:
            docs += first
            batch.append((text, last))
            chars += len(text)
            if chars >= flush_chars:
                flush()
                chars = 0
        flush()
    return rows, docs


def _write_parquet(rows: np.ndarray, order: np.ndarray, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    length = rows.shape[1]
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
    with pq.ParquetWriter(path, schema) as w:
        for i in range(0, len(order), ROW_GROUP):
            chunk = np.asarray(rows[order[i:i + ROW_GROUP]]).astype(np.int32)
            offsets = pa.array(np.arange(0, chunk.size + 1, length, dtype=np.int32))
            ids = pa.ListArray.from_arrays(offsets, pa.array(chunk.reshape(-1)))
            w.write_table(pa.table({"input_ids": ids, "labels": ids}, schema=schema))


def _write_disk(rows: np.ndarray, order: np.ndarray, folder: Path, build: Path) -> None:
    try:
        import datasets
    except ImportError:
        raise UserError("--format disk writes with the datasets package (pip install datasets); parquet needs none") from None

    def gen():
        for i in range(0, len(order), ROW_GROUP):
            for r in np.asarray(rows[order[i:i + ROW_GROUP]]).tolist():
                yield {"input_ids": r, "labels": r}

    features = datasets.Features({k: datasets.Sequence(datasets.Value("int32")) for k in ("input_ids", "labels")})
    datasets.Dataset.from_generator(gen, features=features, cache_dir=str(build)).save_to_disk(str(folder))
