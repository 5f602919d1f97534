"""Text data: documents streamed from a source (llm/sources.py), split by document, tokenised once
into a memory-mapped cache in bounded memory, and packed into fixed-length rows. A pre-tokenised
source (data.ids_field) is read as rows of ids instead (llm/pretokenized.py); `open_text_data`
gives a run either kind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch

from shared.cache import Stale, build_once, cache_root, check_folder
from shared.config import expand_env
from shared.contracts import BatchSource
from shared.epochs import EpochOrder
from shared.errors import ConfigError, UserError

from .sources import (
    describe_source,
    is_validation,
    iter_pieces,
    source_identity,
    training_text,
)
from .tokenizer import TextTokenizer, load_tokenizer

CACHE_VERSION = 3
FLUSH_CHARS = 1 << 20  # training text tokenised per batch: bounds memory, keeps the tokenizer's threads busy
BPE_CHARS = 50_000_000  # a trained BPE learns from the first this-much training text, whatever the budget


@dataclass
class TextDataConfig:
    source: str = "builtin"
    tokenizer: str = "bpe:4096"
    seq_len: int = 256
    val_fraction: float = 0.02  # of documents, chosen by a hash of their text: fixed across runs
    val_tokens: int = 131_072  # validation documents are collected up to this many tokens; evaluation uses these
    max_tokens: int = 0  # training tokens to read (and train on) at most; 0 = the whole source
    text_field: str = "text"
    skip_undecodable: bool = False  # leave out .txt/.jsonl files that are not UTF-8 text (with a note) instead of refusing them
    builtin_docs: int = 6000
    doc_mask: bool = False  # attention stays inside each document of a packed row
    cache_dir: str = ""  # "" = an automatic folder under $BLUEBERRY_CACHE (default .cache/blueberry)
    # pre-tokenised sources (llm/pretokenized.py): rows of token ids, seq_len + 1 of them each, kept whole
    ids_field: str = ""  # the column of token-id lists (5-dollar-llm's: "input_ids"); "" = the source is text
    # "hash": Blueberry's split (by a hash of each document or row); "train_test_split": 5-dollar-llm's
    # (datasets' train_test_split of the rows at test_size val_fraction, their loader's order and validation rows)
    split: Literal["hash", "train_test_split"] = "hash"
    split_seed: int = 42  # train_test_split's seed
    order_seed: int = 42  # train_test_split: the seed of 5-dollar-llm's DataLoader generator (the training order)
    rows: int = 0  # pre-tokenised: read the first this-many rows (0 = all)
    all_rows_above: int = 0  # pre-tokenised: a budget above this many tokens reads every row instead (0 = never)
    val_rows: int = 800  # pre-tokenised: rows evaluated (5-dollar-llm: its first 100 batches of 8)

    def __post_init__(self):
        self.source, self.tokenizer = expand_env(self.source, "data.source"), expand_env(self.tokenizer, "data.tokenizer")
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be at least 2, got {self.seq_len}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.val_tokens < 1 or self.max_tokens < 0:
            raise ConfigError("data.val_tokens must be positive and data.max_tokens non-negative")
        if min(self.rows, self.all_rows_above) < 0 or self.val_rows < 1:
            raise ConfigError("data.rows and data.all_rows_above must not be negative, data.val_rows must be positive")
        if self.split == "train_test_split" and not self.ids_field:
            raise ConfigError("data.split = \"train_test_split\" splits the rows of a pre-tokenised source: set "
                              "data.ids_field (5-dollar-llm's rows: \"input_ids\")")
        if self.ids_field and self.max_tokens:
            raise ConfigError("data.max_tokens is for text sources; a pre-tokenised source reads data.rows rows")


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[-40:] or "data"


# ---------------------------------------------------------------------------------- cache


@dataclass
class TokenCache:
    dir: Path
    meta: dict
    tokenizer: TextTokenizer
    description: str
    train_limit: int = 0  # a run reads the first this-many training tokens (0 = all): the same data whatever the cache holds
    arrays: dict[str, np.ndarray] = field(default_factory=dict, repr=False)  # memory-mapped by prepare_data

    def open(self, split: str) -> np.ndarray:
        # the file may run past meta's count (a longer build of the same data replaced it): a prefix is the same data
        n = self.meta[f"{split}_tokens"]
        return np.memmap(self.dir / f"{split}.bin", dtype=self.meta["dtype"], mode="r", shape=(n,))

    def tokens(self, split: str) -> np.ndarray:
        tokens = self.arrays.get(split)
        if tokens is None:
            tokens = self.arrays[split] = self.open(split)
        if split == "train" and self.train_limit:
            return tokens[:self.train_limit]
        return tokens


class _Writer:
    """Appends documents' tokens, each document closed by EOS, to one split's file."""

    def __init__(self, path: Path, tok: TextTokenizer, dtype):
        self.f, self.tok, self.dtype = open(path, "wb"), tok, dtype
        self.tokens = self.docs = 0
        self.pending: list[tuple[str, bool]] = []
        self.pending_chars = 0

    def add(self, text: str, first: bool, last: bool) -> None:
        self.docs += first
        self.pending.append((text, last))
        self.pending_chars += len(text)
        if self.pending_chars >= FLUSH_CHARS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        for (_, last), ids in zip(self.pending, self.tok.encode_batch_ids([t for t, _ in self.pending])):
            if last:
                ids.append(self.tok.eos_id)
            self.f.write(np.asarray(ids, dtype=self.dtype).tobytes())
            self.tokens += len(ids)
        self.pending, self.pending_chars = [], 0

    def close(self) -> None:
        self.flush()
        self.f.close()


def _build(tmp: Path, cfg: TextDataConfig, tok: TextTokenizer, need: int, log: Callable) -> dict:
    """Stream the source once into tmp/{train,val}.bin. Validation documents (by hash) are kept
    until val_tokens are collected, later ones are dropped (never trained on); training documents
    until `need` tokens (0 = all). Reading stops at the first document boundary where both are met."""
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    tmp.mkdir(parents=True)
    out = {s: _Writer(tmp / f"{s}.bin", tok, dtype) for s in ("train", "val")}
    try:
        return _stream(out, cfg, need, log)
    finally:  # a failed build closes its files too (a long-lived process would keep them open)
        for w in out.values():
            w.f.close()


def _stream(out: dict[str, _Writer], cfg: TextDataConfig, need: int, log: Callable) -> dict:
    val_target, skipped, chars, complete = cfg.val_tokens + 1, 0, 0, True
    side: _Writer | None = None
    last_log = time.monotonic()
    for text, first, last in iter_pieces(cfg.source, cfg.text_field, cfg.builtin_docs, cfg.skip_undecodable, note=log):
        if first:
            if need and out["train"].tokens + out["train"].pending_chars // 2 >= need:
                out["train"].flush()  # near the budget: count exactly
            train_full = need and out["train"].tokens >= need
            if train_full and out["val"].tokens >= val_target:
                complete = False
                break
            if is_validation(text, cfg.val_fraction):
                side = out["val"] if out["val"].tokens < val_target else None
            else:
                side = None if train_full else out["train"]
            skipped += side is None
        if side is not None:
            side.add(text, first, last)
            if side is out["val"]:
                side.flush()  # exact validation counts: the quota decides which documents validate
        chars += len(text)
        if time.monotonic() - last_log > 15:
            log(f"  read {chars / 1e6:,.0f}M characters: {out['train'].tokens:,} training, {out['val'].tokens:,} "
                "validation tokens so far")
            last_log = time.monotonic()
    for w in out.values():
        w.close()
    if out["val"].docs == 0 or out["train"].docs == 0:
        raise UserError(f"{cfg.source}: {out['train'].docs} training and {out['val'].docs} validation documents; "
                        "need at least one of each (raise data.val_fraction, or use more documents)")
    return {"dtype": np.dtype(out["train"].dtype).name, "complete": complete, "skipped_docs": skipped, "chars_read": chars,
            **{f"{s}_tokens": w.tokens for s, w in out.items()}, **{f"{s}_docs": w.docs for s, w in out.items()}}


# everything a token cache folder holds (a row cache of pre-tokenised data: rows.bin and hash.bin)
CACHE_FILES = {"meta.json", "train.bin", "val.bin", "tokenizer.json", "rows.bin", "hash.bin"}
META_KEYS = ("identity", "identity_key", "tokenizer", "tokenizer_fingerprint", "dtype", "complete", "train_tokens",
             "val_tokens", "train_docs", "val_docs")


def _check_meta(meta: dict, where: Path, tok: TextTokenizer, identity_key: str, own: bool) -> None:
    """Refuse a cache of other data or another tokenizer in a folder the user chose (it may be kept on
    purpose); in an automatic folder, whose name holds both, a mismatch is damage: build it again."""
    if meta["tokenizer_fingerprint"] != tok.fingerprint:
        if own:
            raise Stale(f"the token cache {where} holds another tokenizer's tokens: building it again")
        raise UserError(f"token cache {where} was built with tokenizer {meta['tokenizer']!r} "
                        f"({meta['tokenizer_fingerprint']}), this run uses {tok.spec!r} ({tok.fingerprint}): "
                        "delete the cache or choose another data.cache_dir")
    if meta["identity_key"] != identity_key:
        if own:
            raise Stale(f"the token cache {where} was read from other data: building it again")
        raise UserError(f"token cache {where} was read from other data ({meta['identity']['source']!r}; changed files, "
                        "text_field, val_fraction or val_tokens): delete the cache or choose another data.cache_dir")


def _damage(meta: dict, where: Path) -> str:
    """What is wrong with a cache's files against its meta.json ("" = nothing): a file shorter than
    the tokens it should hold would be memory-mapped past its end."""
    if meta.get("version") != CACHE_VERSION:
        return f"format version {meta.get('version')}, this code reads {CACHE_VERSION}"
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        return f"its meta.json lacks {', '.join(missing)}"
    if meta["dtype"] not in ("uint16", "uint32"):
        return f"its meta.json names the dtype {meta['dtype']!r}"
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize
        for split in ("train", "val"):
            want = int(meta[f"{split}_tokens"]) * itemsize
            have = (where / f"{split}.bin").stat().st_size
            if have < want:
                return f"{split}.bin holds {have:,} bytes, its meta.json promises {want:,}"
    except FileNotFoundError as e:
        return f"{Path(e.filename).name} is missing"
    except (TypeError, ValueError) as e:
        return f"its meta.json is garbled ({e})"
    return ""


def _refuse_foreign(where: Path, own: bool, why: str) -> None:
    """A folder the user chose is only rebuilt when it holds nothing but a token cache's files:
    anything else in it is theirs, and a rebuild would delete it."""
    others = sorted(set(os.listdir(where)) - CACHE_FILES)
    if not own and others:
        raise UserError(f"data.cache_dir {where} holds files that are not a token cache's "
                        f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''}) and no cache this run can use "
                        f"({why}): point data.cache_dir at a new or empty folder (the files there are left as they are)")


def _rebuildable(where: Path, own: bool, damage: str) -> Stale:
    _refuse_foreign(where, own, damage)
    return Stale(f"the token cache {where} is unusable ({damage}): building it again")


def read_meta_json(where: Path, own: bool) -> dict | None:
    """A cache folder's meta.json as a dict; None for no folder (or an empty one). A missing or
    unreadable file is a cache to rebuild (ours) or refused (a user's folder)."""
    if not where.is_dir() or not any(where.iterdir()):
        return None
    try:
        meta = json.loads((where / "meta.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except FileNotFoundError:
        raise _rebuildable(where, own, "no meta.json") from None
    except (OSError, ValueError) as e:  # JSONDecodeError is a ValueError
        raise _rebuildable(where, own, f"meta.json is unreadable: {e}") from None
    return meta


def _read_cache(where: Path, tok: TextTokenizer, identity_key: str, need: int, own: bool) -> dict | None:
    """The meta.json of a whole cache in `where` that serves this run; None when there is none yet."""
    meta = read_meta_json(where, own)
    if meta is None:
        return None
    damage = _damage(meta, where)
    if damage:
        raise _rebuildable(where, own, damage)
    _check_meta(meta, where, tok, identity_key, own)
    if not (meta["complete"] or (need and meta["train_tokens"] >= need)):
        _refuse_foreign(where, own, f"it holds {meta['train_tokens']:,} training tokens, this run reads {need:,}")
        raise Stale(f"the token cache {where} holds {meta['train_tokens']:,} training tokens, this run reads "
                    f"{need:,}: reading the source again, further")
    return meta


def _print(*args) -> None:
    print(*args, flush=True)


def prepare_data(cfg: TextDataConfig, log: Callable = _print) -> TokenCache:
    """Tokenizer and token cache for a config, building them once.

    The cache is named by what was read (source, local files' sizes and times, split settings) and
    the tokenizer, not by seq_len or the budget: a cache read for 1B tokens serves an 8M run (which
    uses its first max_tokens), and one too short for a run is read again, further. One process
    builds it, others wait and read it (shared/cache.py); its files are checked against its meta.json
    before they are memory-mapped."""
    root = cache_root()
    identity = source_identity(cfg.source, cfg.text_field, cfg.builtin_docs, cfg.skip_undecodable)
    identity_key = _key(identity, cfg.val_fraction, cfg.val_tokens)
    need = cfg.max_tokens
    tok = load_tokenizer(cfg.tokenizer, lambda: training_text(cfg.source, cfg.text_field, cfg.builtin_docs,
                                                              cfg.val_fraction, BPE_CHARS, cfg.skip_undecodable),
                         root / "tokenizers", identity_key)
    own = not cfg.cache_dir  # an automatic folder is ours to rebuild; a data.cache_dir is the user's
    where = (root / "tokens" / f"{_slug(cfg.source)}-{_key(identity_key, tok.fingerprint)}" if own
             else check_folder(Path(cfg.cache_dir).expanduser(), f"data.cache_dir {cfg.cache_dir}"))
    desc = describe_source(cfg.source, cfg.builtin_docs)

    def read() -> TokenCache | None:
        meta = _read_cache(where, tok, identity_key, need, own)
        if meta is None:
            return None
        cache = TokenCache(where, meta, tok, f"{desc} [token cache {where}]", need)
        try:  # mapped now, checked: a cache replaced later by a longer build keeps these files alive
            cache.arrays = {s: cache.open(s) for s in ("train", "val")}
        except (OSError, ValueError) as e:  # replaced between the check and the mapping
            raise Stale(f"the token cache {where} changed while it was read ({e}): building it again") from None
        return cache

    def build(tmp: Path) -> None:
        log(f"tokenising {desc} with {tok.spec} into {where}"
            + (f" (until {need:,} training tokens)" if need else "") + " ...")
        stream_for_val = cfg.val_tokens / cfg.val_fraction
        if need and stream_for_val > 1.5 * need:
            log(f"note: {cfg.val_tokens:,} validation tokens at val_fraction {cfg.val_fraction:g} take about "
                f"{stream_for_val:,.0f} tokens of stream, well past the {need:,} this run trains on; raise "
                "data.val_fraction or lower data.val_tokens to read less")
        meta = {"version": CACHE_VERSION, "identity": identity, "identity_key": identity_key, "tokenizer": tok.spec,
                "tokenizer_fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
                **_build(tmp, cfg, tok, need, log)}
        tok.save(tmp / "tokenizer.json")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))  # last: a folder with meta.json is whole

    return build_once(where, read, build, "the token cache", log)


# ---------------------------------------------------------------------------------- batches


class PackedBatches(BatchSource):
    """Random rows of seq_len + 1 tokens from the packed training stream, epoch by epoch.

    The order is a pure function of (seed, epoch), so the position (epoch, cursor) is all that a
    checkpoint needs to continue the exact same sequence of batches.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int):
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.n_rows = (len(tokens) - 1) // seq_len
        if self.n_rows < batch_size:
            raise UserError(f"the training split has {len(tokens):,} tokens: fewer than one batch of {batch_size} "
                            f"rows of {seq_len + 1}; lower train.batch_size or data.seq_len, or use more data")
        self.units_per_batch = batch_size * seq_len
        self.order = EpochOrder(self.n_rows, batch_size, seed, what="rows")

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows, _ = self.order.next()
        starts = rows.numpy() * self.seq_len
        chunk = np.stack([self.tokens[s:s + self.seq_len + 1] for s in starts]).astype(np.int64)
        chunk = torch.from_numpy(chunk)
        return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()  # views of stride T + 1 would pin slowly

    def skip_batch(self) -> None:
        """Advance past a batch without building it (another process trains on it)."""
        self.order.next()

    def state_dict(self) -> dict:  # the keys checkpoints have always held
        s = self.order.state_dict()
        return {"epoch": s["epoch"], "cursor": s["cursor"], "seed": s["seed"], "n_rows": s["n"]}

    def load_state_dict(self, state: dict) -> None:
        if state["n_rows"] != self.n_rows or state["seed"] != self.order.seed:
            raise UserError("the checkpoint's data position does not fit this data (different data, seq_len or seed)")
        self.order.load_state_dict({**state, "n": state["n_rows"]})


def validation_rows(tokens: np.ndarray, seq_len: int, max_tokens: int) -> torch.Tensor:
    """The fixed evaluation set: consecutive rows of seq_len + 1 from the validation stream."""
    n = min(len(tokens), max_tokens + 1) if max_tokens else len(tokens)
    rows = (n - 1) // seq_len
    if rows < 1:
        raise UserError(f"the validation split has {len(tokens):,} tokens, fewer than one row of {seq_len + 1}; "
                        "raise data.val_fraction or data.val_tokens, or lower data.seq_len")
    idx = np.arange(rows)[:, None] * seq_len + np.arange(seq_len + 1)[None]
    return torch.from_numpy(np.asarray(tokens[: rows * seq_len + 1])[idx].astype(np.int64))


# ---------------------------------------------------------------------------------- a run's data


@dataclass
class TextData:
    """What a training run takes from its data, whichever kind of source it has."""

    tokenizer: TextTokenizer
    description: str
    lines: list[str]  # what the run prints about its data
    train: BatchSource
    val: torch.Tensor  # the fixed validation rows [n, seq_len + 1]
    identity: dict  # what was trained and evaluated on, with a content hash (the run's data.json)


def content_hash(*arrays: np.ndarray) -> str:
    """sha256 of the arrays' bytes, read a slice at a time (they may be memory maps of gigabytes)."""
    h = hashlib.sha256()
    for a in arrays:
        flat = a.reshape(-1)
        step = max(1, (16 << 20) // max(1, flat.itemsize))
        for i in range(0, len(flat), step):
            h.update(np.ascontiguousarray(flat[i:i + step]).tobytes())
    return h.hexdigest()[:16]


def open_text_data(cfg: TextDataConfig, batch_size: int, seed: int, budget: int, log: Callable = _print) -> TextData:
    """The training batches and validation rows of a data config: a pre-tokenised source's rows
    (llm/pretokenized.py) or a text source's packed token stream."""
    if cfg.ids_field:
        from .pretokenized import open_rows  # it builds on this module

        return open_rows(cfg, batch_size, seed, budget, log)
    cache = prepare_data(cfg, log)
    tok = cache.tokenizer
    train, val_tokens = cache.tokens("train"), cache.tokens("val")
    lines = [f"data: {cache.description}",
             f"tokens: {len(train):,} train / {len(val_tokens):,} validation "
             f"({cache.meta['train_docs']:,} / {cache.meta['val_docs']:,} documents in the cache)"]
    if len(val_tokens) < 16 * (cfg.seq_len + 1):
        lines.append(f"warning: only {len(val_tokens):,} validation tokens, a noisy estimate; raise data.val_fraction")
    val = validation_rows(val_tokens, cfg.seq_len, cfg.val_tokens)
    identity = {"source": cfg.source, "tokenizer": tok.spec, "tokenizer_fingerprint": tok.fingerprint, "split": "hash",
                "seq_len": cfg.seq_len, "train_tokens": len(train), "val_predictions": int(val.shape[0] * cfg.seq_len),
                "sha256": content_hash(train, val_tokens[:val.shape[0] * cfg.seq_len + 1])}
    return TextData(tok, cache.description, lines, PackedBatches(train, cfg.seq_len, batch_size, seed), val, identity)
