"""Text data: documents from the Hub, local files or the built-in corpus; tokenised once into a
memory-mapped cache with document boundaries; split by document; packed into fixed-length rows.

Data specs (`data.source` or `--data`):
  builtin                      the generated offline corpus (llm/corpus.py)
  hf:OWNER/NAME[:CONFIG]       a Hugging Face dataset, streamed (e.g. hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2)
  PATH                         a .txt / .jsonl / .parquet file, or a folder of them (searched recursively)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from shared.cache import cache_root
from shared.epochs import EpochOrder
from shared.errors import ConfigError, UserError
from shared.hub import require_hub

from .corpus import generate_corpus
from .tokenizer import TextTokenizer, load_tokenizer

CACHE_VERSION = 2
SUFFIXES = (".txt", ".jsonl", ".parquet")
OFFLINE_OPTIONS = "use --data builtin (generated offline corpus) or --data PATH (a .txt/.jsonl/.parquet file or folder)"


@dataclass
class TextDataConfig:
    source: str = "builtin"
    tokenizer: str = "bpe:4096"
    seq_len: int = 256
    val_fraction: float = 0.02  # of documents, chosen by a hash of their text: fixed across runs
    val_tokens: int = 131_072  # evaluation uses the first this-many validation tokens
    max_tokens: int = 0  # stop reading the source after about this many tokens; 0 = all of it
    text_field: str = "text"
    builtin_docs: int = 6000
    cache_dir: str = ""  # "" = an automatic folder under $BLUEBERRY_CACHE (default .cache/blueberry)

    def __post_init__(self):
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len must be at least 2, got {self.seq_len}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[-40:] or "data"


# ---------------------------------------------------------------------------------- documents


def _read_file(path: Path, field: str) -> list[str]:
    try:
        return _parse_file(path, field)
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:  # unreadable, or pyarrow's ArrowInvalid for a damaged parquet file
        raise UserError(f"cannot read {path}: {e}") from None


def _parse_file(path: Path, field: str) -> list[str]:
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)[field])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{i + 1} is not a JSON object with a {field!r} field") from None
        return docs
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except pa.ArrowException as e:
        raise UserError(f"{path} is not a readable parquet file: {e}") from None
    if field not in table.column_names:
        raise UserError(f"{path} has no column {field!r} (columns: {', '.join(table.column_names)})")
    return [t for t in table.column(field).to_pylist() if t]


def _local_documents(path: Path, field: str, max_chars: int) -> list[str]:
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise UserError(f"{path}: unsupported file type; use {', '.join(SUFFIXES)}")
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise UserError(f"no {'/'.join(SUFFIXES)} files under {path}")
    docs, chars = [], 0
    for f in files:
        for d in _read_file(f, field):
            docs.append(d)
            chars += len(d)
            if max_chars and chars >= max_chars:
                return docs
    return docs


def _hub_documents(spec: str, field: str, max_chars: int, val_chars: int, val_fraction: float) -> list[str]:
    """Stream documents until the training side has max_chars and the validation side val_chars.

    Validation documents are picked by hash in stream order, so the first val_chars of them are
    the same whatever the training budget: runs with different --train_tokens evaluate alike."""
    name, _, config = spec.partition(":")
    if not max_chars:
        raise UserError(f"streaming {spec!r} needs a limit: set data.max_tokens (the script sets it from --train_tokens)")
    require_hub(f"dataset {name!r}", OFFLINE_OPTIONS)
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
        docs, chars = [], {True: 0, False: 0}
        for row in ds:
            docs.append(row[field])
            chars[is_validation(row[field], val_fraction)] += len(row[field])
            if chars[False] >= max_chars and chars[True] >= val_chars:
                break
    except KeyError:
        raise UserError(f"dataset {name!r} has no {field!r} field; set data.text_field") from None
    except Exception as e:  # connection failures come wrapped in several exception types
        raise UserError(f"could not stream {name!r} from the Hugging Face Hub ({type(e).__name__}); "
                        f"offline? {OFFLINE_OPTIONS}") from None
    return docs


def load_documents(cfg: TextDataConfig) -> tuple[list[str], str]:
    """All documents of the source (up to about max_tokens) and a one-line description."""
    max_chars = cfg.max_tokens * 5  # a generous chars-per-token bound; tokens are trimmed later
    if cfg.source == "builtin":
        return generate_corpus(cfg.builtin_docs), f"built-in generated corpus ({cfg.builtin_docs} documents)"
    if cfg.source.startswith("hf:"):
        docs = _hub_documents(cfg.source[3:], cfg.text_field, max_chars, cfg.val_tokens * 6, cfg.val_fraction)
        return docs, f"Hugging Face dataset {cfg.source[3:]} ({len(docs)} documents streamed)"
    path = Path(cfg.source).expanduser()
    if not path.exists():
        raise UserError(f"data path not found: {path} ({OFFLINE_OPTIONS.replace('use ', 'or use ')})")
    docs = _local_documents(path, cfg.text_field, max_chars)
    return docs, f"local files at {path} ({len(docs)} documents)"


def is_validation(doc: str, fraction: float) -> bool:
    """Documents go to validation by a hash of their text: no document is in both splits and the
    split does not depend on file order, the seed, or how much of the source was read."""
    h = int.from_bytes(hashlib.blake2b(doc.encode("utf-8", "replace"), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


def split_documents(docs: list[str], fraction: float) -> tuple[list[str], list[str]]:
    flags = [is_validation(d, fraction) for d in docs]
    train = [d for d, v in zip(docs, flags) if not v]
    val = [d for d, v in zip(docs, flags) if v]
    if not val and len(train) > 1:  # tiny sources: the document with the smallest hash validates
        i = min(range(len(docs)), key=lambda j: hashlib.blake2b(docs[j].encode("utf-8", "replace")).digest())
        train, val = [d for j, d in enumerate(docs) if j != i], [docs[i]]
    if not train or not val:
        raise UserError(f"need at least two documents to split train from validation, got {len(docs)}")
    return train, val


# ---------------------------------------------------------------------------------- cache


def _tokenize_to(path: Path, docs: list[str], tok: TextTokenizer, dtype, limit: int) -> tuple[int, np.ndarray]:
    """Write tokens of docs, each followed by EOS, to `path`; return count and doc start offsets."""
    starts, total = [], 0
    with open(path, "wb") as f:
        for i in range(0, len(docs), 256):
            for ids in tok.encode_batch(docs[i:i + 256]):
                ids.append(tok.eos_id)
                starts.append(total)
                f.write(np.asarray(ids, dtype=dtype).tobytes())
                total += len(ids)
                if limit and total >= limit:
                    return total, np.asarray(starts, dtype=np.int64)
    return total, np.asarray(starts, dtype=np.int64)


@dataclass
class TokenCache:
    dir: Path
    meta: dict
    tokenizer: TextTokenizer
    description: str

    def tokens(self, split: str) -> np.ndarray:
        return np.memmap(self.dir / f"{split}.bin", dtype=self.meta["dtype"], mode="r")

    def doc_starts(self, split: str) -> np.ndarray:
        return np.load(self.dir / f"{split}_docs.npy")


def _check_meta(meta: dict, where: Path, tok: TextTokenizer, cfg: TextDataConfig, source_key: str) -> None:
    if meta.get("version") != CACHE_VERSION:
        raise UserError(f"token cache {where} has format version {meta.get('version')}, expected {CACHE_VERSION}: delete it")
    if meta["tokenizer_fingerprint"] != tok.fingerprint:
        raise UserError(f"token cache {where} was built with tokenizer {meta['tokenizer']!r} "
                        f"({meta['tokenizer_fingerprint']}), this run uses {tok.spec!r} ({tok.fingerprint}): "
                        "delete the cache or choose another data.cache_dir")
    if meta["seq_len"] != cfg.seq_len:
        raise UserError(f"token cache {where} was built for seq_len {meta['seq_len']}, this run uses {cfg.seq_len}: "
                        "delete the cache or choose another data.cache_dir")
    if meta["source"] != cfg.source:
        raise UserError(f"token cache {where} holds {meta['source']!r}, this run reads {cfg.source!r}")
    if meta["source_key"] != source_key:
        raise UserError(f"token cache {where} was built with other data settings (max_tokens, val_fraction, text_field "
                        "or builtin_docs): delete the cache or choose another data.cache_dir")


def prepare_data(cfg: TextDataConfig, log=print) -> TokenCache:
    """Tokenizer and token cache for a config, building them once."""
    root = cache_root()
    source_key = _key(cfg.source, cfg.text_field, cfg.max_tokens, cfg.val_fraction,
                      cfg.builtin_docs if cfg.source == "builtin" else None)
    explicit = Path(cfg.cache_dir) if cfg.cache_dir else None
    docs: dict = {}

    def documents() -> tuple[list[str], list[str], str]:
        if not docs:
            all_docs, desc = load_documents(cfg)
            docs["train"], docs["val"] = split_documents(all_docs, cfg.val_fraction)
            docs["desc"] = desc
        return docs["train"], docs["val"], docs["desc"]

    tok = load_tokenizer(cfg.tokenizer, lambda: documents()[0], root / "tokenizers", source_key)
    where = explicit or root / "tokens" / f"{_slug(cfg.source)}-{_key(source_key, tok.fingerprint, cfg.seq_len)}"
    meta_path = where / "meta.json"
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            raise UserError(f"{meta_path} is corrupt: delete {where} and rerun") from None
        _check_meta(meta, where, tok, cfg, source_key)
        return TokenCache(where, meta, tok, meta["description"] + f" [token cache {where}]")

    train, val, desc = documents()
    log(f"tokenising {len(train) + len(val)} documents with {tok.spec} into {where} ...")
    tmp = where.with_name(where.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    n_train, train_starts = _tokenize_to(tmp / "train.bin", train, tok, dtype, cfg.max_tokens)
    n_val, val_starts = _tokenize_to(tmp / "val.bin", val, tok, dtype, 0)
    np.save(tmp / "train_docs.npy", train_starts)
    np.save(tmp / "val_docs.npy", val_starts)
    tok.save(tmp / "tokenizer.json")
    meta = {"version": CACHE_VERSION, "source": cfg.source, "source_key": source_key, "description": desc, "tokenizer": tok.spec,
            "tokenizer_fingerprint": tok.fingerprint, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id,
            "seq_len": cfg.seq_len, "dtype": np.dtype(dtype).name, "train_tokens": n_train, "val_tokens": n_val,
            "train_docs": len(train_starts), "val_docs": len(val_starts)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    if where.exists():
        raise UserError(f"{where} exists but has no meta.json (an interrupted build?): delete it and rerun")
    where.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, where)
    return TokenCache(where, meta, tok, desc + f" [token cache {where}]")


# ---------------------------------------------------------------------------------- batches


class PackedBatches:
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
        return chunk[:, :-1], chunk[:, 1:]

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
