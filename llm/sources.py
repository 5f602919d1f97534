"""Where documents come from, read as a stream: nothing here holds a corpus in memory.

Data specs (`data.source` or `--data`):
  builtin                      the generated offline corpus (llm/corpus.py)
  hf:OWNER/NAME[:CONFIG]       a Hugging Face dataset, streamed (e.g. hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2)
  PATH                         a .txt / .jsonl / .parquet file, or a folder of them (searched recursively)

A source yields pieces `(text, first, last)`: a document longer than PIECE_CHARS (a book-sized .txt
file is one document) arrives in pieces cut at line ends, so a corpus of any size, and a document
of any size, is read and tokenised in bounded memory. Tokens can differ from tokenising the whole
document only where a cut falls, at a newline.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterator

from shared.errors import UserError
from shared.hub import require_hub

from .corpus import generate_corpus

SUFFIXES = (".txt", ".jsonl", ".parquet")
OFFLINE_OPTIONS = "use --data builtin (generated offline corpus) or --data PATH (a .txt/.jsonl/.parquet file or folder)"
PIECE_CHARS = 1 << 16  # measured: the tokenizer's peak memory grows with the longest text it is given
Piece = tuple[str, bool, bool]  # text, first piece of its document, last piece of its document


def is_validation(first_piece: str, fraction: float) -> bool:
    """Documents go to validation by a hash of their (first piece of) text: no document is in
    both splits, duplicates land together, and the split depends on neither file order, seed nor
    how much of the source is read."""
    h = int.from_bytes(hashlib.blake2b(first_piece.encode("utf-8", "replace"), digest_size=8).digest(), "big")
    return h / 2**64 < fraction


def local_files(path: Path) -> list[Path]:
    if not path.exists():
        raise UserError(f"data path not found: {path} ({OFFLINE_OPTIONS.replace('use ', 'or use ')})")
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise UserError(f"{path}: unsupported file type; use {', '.join(SUFFIXES)}")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
    if not files:
        raise UserError(f"no {'/'.join(SUFFIXES)} files under {path}")
    return files


def source_identity(source: str, text_field: str, builtin_docs: int) -> dict:
    """What a token cache was read from. Local files count by path, size and modification time,
    so an edited file is read again; a Hub dataset by its name."""
    if source == "builtin":
        return {"source": source, "builtin_docs": builtin_docs}
    if source.startswith("hf:"):
        return {"source": source, "text_field": text_field}
    root = Path(source).expanduser()
    files = local_files(root)
    stats = [[str(f.relative_to(root)) if f != root else f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return {"source": str(root.resolve()), "text_field": text_field, "files": stats}


def _txt_pieces(path: Path) -> Iterator[Piece]:
    with open(path, encoding="utf-8", errors="replace") as f:
        piece, first = f.read(PIECE_CHARS), True
        while True:
            piece += f.readline(PIECE_CHARS)  # cut at a line end (or after two pieces' worth without one)
            after = f.read(PIECE_CHARS)
            yield piece, first, not after
            if not after:
                return
            piece, first = after, False


def _split(text: str) -> Iterator[Piece]:
    """One document in pieces of about PIECE_CHARS, cut after a newline where there is one."""
    start = 0
    while len(text) - start > 2 * PIECE_CHARS:
        cut = text.find("\n", start + PIECE_CHARS, start + 2 * PIECE_CHARS)
        end = cut + 1 if cut >= 0 else start + PIECE_CHARS
        yield text[start:end], start == 0, False
        start = end
    yield text[start:], start == 0, True


def _jsonl_docs(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                text = json.loads(line)[field]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{i + 1} is not a JSON object with a {field!r} field") from None
            if not isinstance(text, str):
                raise UserError(f"{path}:{i + 1}: field {field!r} holds {type(text).__name__}, not text")
            if text:
                yield text


def _parquet_docs(path: Path, field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        if field not in pf.schema_arrow.names:
            raise UserError(f"{path} has no column {field!r} (columns: {', '.join(pf.schema_arrow.names)})")
        kind = pf.schema_arrow.field(field).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise UserError(f"{path}: column {field!r} holds {kind}, not text")
        for batch in pf.iter_batches(batch_size=1024, columns=[field]):
            yield from (t for t in batch.column(0).to_pylist() if t)
    except pa.ArrowException as e:
        raise UserError(f"{path} is not a readable parquet file: {e}") from None


def _file_pieces(path: Path, field: str) -> Iterator[Piece]:
    try:
        if path.suffix == ".txt":
            yield from _txt_pieces(path)
        else:
            docs = _jsonl_docs(path, field) if path.suffix == ".jsonl" else _parquet_docs(path, field)
            yield from (p for d in docs for p in _split(d))
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e}") from None


CONNECTION_ERRORS = ("ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "ConnectError", "TimeoutError",
                     "RemoteDisconnected", "ChunkedEncodingError", "OfflineModeIsEnabled")


def _hub_failure(name: str, e: Exception) -> UserError:
    """The Hub's own message (a misspelled config name says so); the offline options only when the
    failure is the connection."""
    message = (str(e).strip().splitlines() or [""])[0][:300]
    kind = type(e).__name__
    if kind in CONNECTION_ERRORS or isinstance(e, (ConnectionError, TimeoutError)):
        return UserError(f"lost the connection to the Hugging Face Hub while streaming {name!r} ({kind}: {message}); "
                         f"{OFFLINE_OPTIONS}")
    return UserError(f"could not stream {name!r} from the Hugging Face Hub: {kind}: {message}")


def _hub_pieces(spec: str, field: str) -> Iterator[Piece]:
    name, _, config = spec.partition(":")
    require_hub(f"dataset {name!r}", OFFLINE_OPTIONS)
    import datasets

    try:
        rows = iter(datasets.load_dataset(name, config or None, split="train", streaming=True))
    except Exception as e:  # DatasetNotFoundError, ValueError for an unknown config, connection errors...
        raise _hub_failure(name, e) from None
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise _hub_failure(name, e) from None
        if field not in row:
            raise UserError(f"dataset {name!r} has no {field!r} field (fields: {', '.join(row)}); set data.text_field")
        if not isinstance(row[field], str):
            raise UserError(f"dataset {name!r}: field {field!r} holds {type(row[field]).__name__}, not text; set data.text_field")
        if row[field]:
            yield from _split(row[field])


def iter_pieces(source: str, text_field: str, builtin_docs: int) -> Iterator[Piece]:
    if source == "builtin":
        return (p for d in generate_corpus(builtin_docs) for p in _split(d))
    if source.startswith("hf:"):
        return _hub_pieces(source[3:], text_field)
    files = local_files(Path(source).expanduser())
    return (p for f in files for p in _file_pieces(f, text_field))


def describe_source(source: str, builtin_docs: int) -> str:
    if source == "builtin":
        return f"built-in generated corpus ({builtin_docs} documents)"
    if source.startswith("hf:"):
        return f"Hugging Face dataset {source[3:]} (streamed)"
    return f"local files at {Path(source).expanduser()}"


def training_text(source: str, text_field: str, builtin_docs: int, fraction: float, max_chars: int) -> Iterator[str]:
    """Training-side text (never a validation document) up to max_chars: what a BPE learns from."""
    chars, keep = 0, False
    for text, first, _ in iter_pieces(source, text_field, builtin_docs):
        if first:
            if chars >= max_chars:
                return
            keep = not is_validation(text, fraction)
        if keep:
            chars += len(text)
            yield text
