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

import codecs
import hashlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

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


# Checked local text: a cache read before files were checked may hold a binary file's bytes as text,
# so the identity says the files were checked and such a cache is read again.
TEXT_CHECK = 1


def source_identity(source: str, text_field: str, builtin_docs: int, skip_undecodable: bool = False) -> dict:
    """What a token cache was read from. Local files count by path, size and modification time,
    so an edited file is read again; a Hub dataset by its name."""
    if source == "builtin":
        return {"source": source, "builtin_docs": builtin_docs}
    if source.startswith("hf:"):
        return {"source": source, "text_field": text_field}
    root = Path(source).expanduser()
    files = local_files(root)
    stats = [[str(f.relative_to(root)) if f != root else f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    out = {"source": str(root.resolve()), "text_field": text_field, "files": stats, "text_check": TEXT_CHECK}
    return {**out, "skip_undecodable": True} if skip_undecodable else out


# ---------------------------------------------------------------------------------- decoding

# Above this fraction of undecodable bytes a file is not UTF-8 text. The real corpus's worst file
# (text/inaugural/2005-Bush.txt: another encoding's quotes) has 0.45%; random bytes have about 43%
# (and a NUL byte in every 256).
UNDECODABLE_MAX = 0.01
UNDECODABLE_FEW = 8  # a stray few bytes are a stray few characters, however short the file
SCAN_BYTES = 1 << 20
_counted = threading.local()


def _count_undecodable(e: UnicodeDecodeError) -> tuple[str, int]:
    """The "replace" error handler that also counts the bytes it replaces."""
    _counted.bytes = getattr(_counted, "bytes", 0) + e.end - e.start
    return "\ufffd", e.end


codecs.register_error("blueberry-count", _count_undecodable)


@dataclass(frozen=True)
class Decoding:
    size: int  # bytes in the file
    scanned: int  # bytes checked: all of them, unless the file was found not to be text sooner
    undecodable: int  # bytes that are not UTF-8 (read as U+FFFD)
    nul: int  # NUL bytes: text never holds one, binary files do (git and grep call such files binary)

    @property
    def is_text(self) -> bool:
        return self.nul == 0 and self.undecodable <= limit(self.size)

    def reason(self) -> str:
        found = [f"{self.nul:,} NUL bytes"] if self.nul else []
        if self.undecodable:
            found.append(f"{self.undecodable / max(self.scanned, 1):.1%} of bytes undecodable")
        return (f"{' and '.join(found)} in its first {self.scanned:,} bytes (text has no NUL and at most "
                f"{UNDECODABLE_MAX:.0%} undecodable)")


def limit(size: int) -> float:
    """The most undecodable bytes a file of `size` bytes may hold and still be read as text."""
    return max(UNDECODABLE_MAX * size, UNDECODABLE_FEW)


def scan_decoding(path: Path) -> Decoding:
    """Count a file's undecodable and NUL bytes, stopping once it is clearly not text."""
    size = path.stat().st_size
    decoder = codecs.getincrementaldecoder("utf-8")("blueberry-count")
    _counted.bytes = scanned = nul = 0
    with open(path, "rb") as f:
        while chunk := f.read(SCAN_BYTES):
            decoder.decode(chunk)
            scanned += len(chunk)
            nul += chunk.count(b"\0")
            if nul or _counted.bytes > limit(size):
                break
        else:
            decoder.decode(b"", final=True)  # a sequence cut off by the end of the file
    return Decoding(size, scanned, _counted.bytes, nul)


_scans: dict[tuple, Decoding] = {}  # per process: a file read twice (BPE training, then the cache) is scanned
_noted: set[tuple] = set()  # and named once


def _print(*args) -> None:
    print(*args, flush=True)


def check_text_file(path: Path, skip_undecodable: bool = False, note: Callable = _print) -> bool:
    """Whether to read `path`: True for text (a note names any bytes replaced), False for a file that
    is not text under skip_undecodable (with a note); otherwise such a file is refused."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    d = _scans.get(key) or _scans.setdefault(key, scan_decoding(path))
    if not d.is_text and not skip_undecodable:
        raise UserError(f"{path} is not UTF-8 text: {d.reason()}; remove it, or set data.skip_undecodable=true "
                        "to leave such files out")
    if key not in _noted and (d.undecodable or d.nul):
        _noted.add(key)
        if not d.is_text:
            note(f"note: skipped {path}: not UTF-8 text: {d.reason()}")
        else:
            n = d.undecodable
            note(f"note: {path}: {n:,} undecodable byte{'s' * (n > 1)} (not UTF-8) replaced by U+FFFD")
    return d.is_text


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
    with open(path, encoding="utf-8", errors="replace") as f:  # checked first, as .txt files are
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


def _file_pieces(path: Path, field: str, skip_undecodable: bool, note: Callable) -> Iterator[Piece]:
    try:
        if path.suffix in (".txt", ".jsonl") and not check_text_file(path, skip_undecodable, note):
            return
        if path.suffix == ".txt":
            yield from _txt_pieces(path)
        else:
            docs = _jsonl_docs(path, field) if path.suffix == ".jsonl" else _parquet_docs(path, field)
            yield from (p for d in docs for p in _split(d))
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


def iter_pieces(source: str, text_field: str, builtin_docs: int, skip_undecodable: bool = False,
                note: Callable = _print) -> Iterator[Piece]:
    """Every piece of the source. `note` hears about replaced bytes and skipped files."""
    if source == "builtin":
        return (p for d in generate_corpus(builtin_docs) for p in _split(d))
    if source.startswith("hf:"):
        return _hub_pieces(source[3:], text_field)
    files = local_files(Path(source).expanduser())
    return (p for f in files for p in _file_pieces(f, text_field, skip_undecodable, note))


def describe_source(source: str, builtin_docs: int) -> str:
    if source == "builtin":
        return f"built-in generated corpus ({builtin_docs} documents)"
    if source.startswith("hf:"):
        return f"Hugging Face dataset {source[3:]} (streamed)"
    return f"local files at {Path(source).expanduser()}"


def training_text(source: str, text_field: str, builtin_docs: int, fraction: float, max_chars: int,
                  skip_undecodable: bool = False, note: Callable = _print) -> Iterator[str]:
    """Training-side text (never a validation document) up to max_chars: what a BPE learns from."""
    chars, keep = 0, False
    for text, first, _ in iter_pieces(source, text_field, builtin_docs, skip_undecodable, note):
        if first:
            if chars >= max_chars:
                return
            keep = not is_validation(text, fraction)
        if keep:
            chars += len(text)
            yield text
