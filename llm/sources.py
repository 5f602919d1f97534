"""Where documents come from, read as a stream: nothing here holds a corpus in memory.

Data specs (`data.source` or `--data`):
  builtin                      the generated offline corpus (llm/corpus.py)
  hf:OWNER/NAME[:CONFIG]       a Hugging Face dataset, streamed (e.g. hf:HuggingFaceTB/smollm-corpus:cosmopedia-v2)
  PATH                         a .txt / .jsonl / .parquet file, or a folder of them (searched recursively)

With `data.ids_field` set the source is pre-tokenised (TokenRowsSource): its rows hold token ids in
that column, from the Hub, a folder written by datasets' save_to_disk, or .parquet / .jsonl files.

Each kind is one small class (BuiltinSource, HubSource, LocalSource, TokenRowsSource) with the
things a run asks of it: `identity()` (what a token cache was read from), `pieces()` (text) or
`rows()` (token ids) and `describe()`; `open_source` turns a spec into one.

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
from typing import Callable, Iterator, Protocol

import numpy as np

from shared.errors import UserError
from shared.hub import hub_failure, require_hub

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
    expected = f"a JSON object with a {field!r} field"
    for i, row in jsonl_rows(path, expected, errors="replace"):  # checked first, as .txt files are
        if field not in row:
            raise UserError(f"{path}:{i} is not {expected}")
        text = row[field]
        if not isinstance(text, str):
            raise UserError(f"{path}:{i}: field {field!r} holds {type(text).__name__}, not text")
        if text:
            yield text


def _parquet_docs(path: Path, field: str) -> Iterator[str]:
    return (t for t in parquet_rows(path, field) if t)


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


def _hub_failure(name: str, e: Exception) -> UserError:
    """The Hub's own message (a misspelled config name says so); the offline options only when the
    failure is the connection."""
    what, lost = hub_failure(e)
    if lost:
        return UserError(f"lost the connection to the Hugging Face Hub while streaming {name!r} ({what}); "
                         f"{OFFLINE_OPTIONS}")
    return UserError(f"could not stream {name!r} from the Hugging Face Hub: {what}")


def _hub_stream(spec: str) -> tuple[str, Iterator[dict]]:
    """(name, rows) of a Hub dataset `name[:config]`'s training split, streamed; one line when it cannot be."""
    name, _, config = spec.partition(":")
    require_hub(f"dataset {name!r}", OFFLINE_OPTIONS)
    import datasets

    try:
        return name, iter(datasets.load_dataset(name, config or None, split="train", streaming=True))
    except Exception as e:  # DatasetNotFoundError, ValueError for an unknown config, connection errors...
        raise _hub_failure(name, e) from None


def _hub_pieces(spec: str, field: str) -> Iterator[Piece]:
    name, rows = _hub_stream(spec)
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


# ---------------------------------------------------------------------------------- sources

# Checked local text: a cache read before files were checked may hold a binary file's bytes as text,
# so the identity says the files were checked and such a cache is read again.
TEXT_CHECK = 1


class Source(Protocol):
    def identity(self) -> dict:
        """What a token cache was read from: the cache's name follows it, so it never changes for
        the same data (existing caches keep their names)."""

    def pieces(self, note: Callable = _print) -> Iterator[Piece]:
        """Every piece of the source; `note` hears about replaced bytes and skipped files."""

    def describe(self) -> str:
        """The source in words, for the run's output."""


@dataclass(frozen=True)
class BuiltinSource:
    docs: int

    def identity(self) -> dict:
        return {"source": "builtin", "builtin_docs": self.docs}

    def pieces(self, note: Callable = _print) -> Iterator[Piece]:
        return (p for d in generate_corpus(self.docs) for p in _split(d))

    def describe(self) -> str:
        return f"built-in generated corpus ({self.docs} documents)"


@dataclass(frozen=True)
class HubSource:
    spec: str  # OWNER/NAME[:CONFIG], without the "hf:"
    text_field: str

    def identity(self) -> dict:
        return {"source": f"hf:{self.spec}", "text_field": self.text_field}

    def pieces(self, note: Callable = _print) -> Iterator[Piece]:
        return _hub_pieces(self.spec, self.text_field)

    def describe(self) -> str:
        return f"Hugging Face dataset {self.spec} (streamed)"


@dataclass(frozen=True)
class LocalSource:
    """A file or a folder of them. Files count by path, size and modification time, so an edited
    file is read again."""

    root: Path
    text_field: str
    skip_undecodable: bool = False  # leave out files that are not UTF-8 text instead of refusing them

    def identity(self) -> dict:
        root = self.root
        stats = [[str(f.relative_to(root)) if f != root else f.name, f.stat().st_size, f.stat().st_mtime_ns]
                 for f in local_files(root)]
        out = {"source": str(root.resolve()), "text_field": self.text_field, "files": stats, "text_check": TEXT_CHECK}
        return {**out, "skip_undecodable": True} if self.skip_undecodable else out

    def pieces(self, note: Callable = _print) -> Iterator[Piece]:
        files = local_files(self.root)
        return (p for f in files for p in _file_pieces(f, self.text_field, self.skip_undecodable, note))

    def describe(self) -> str:
        return f"local files at {self.root}"


@dataclass(frozen=True)
class TokenRowsSource:
    """Pre-tokenised rows: each holds a list of token ids in column `ids_field`, read in batches as
    stored (bounded memory, no tokenizer). `spec` is hf:OWNER/NAME[:CONFIG] (streamed), a folder
    written by datasets' save_to_disk (a DatasetDict's "train" split), a .parquet or .jsonl file, or
    a folder of them. Local files count by path, size and modification time, as LocalSource's do."""

    spec: str
    ids_field: str

    def identity(self) -> dict:
        if self.spec.startswith("hf:"):
            return {"source": self.spec, "ids_field": self.ids_field}
        root = Path(self.spec).expanduser()
        files = _row_files(root)
        stats = [[str(f.relative_to(root)) if f != root else f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]
        return {"source": str(root.resolve()), "ids_field": self.ids_field, "files": stats}

    def rows(self) -> Iterator[RowBatch]:
        """Batches of rows as (lengths [k], ids [sum of lengths]), in the source's order."""
        if self.spec.startswith("hf:"):
            return _hub_rows(self.spec[3:], self.ids_field)
        root = Path(self.spec).expanduser()
        return (b for f in _row_files(root) for b in _file_rows(f, self.ids_field))

    def pieces(self, note: Callable = _print) -> Iterator[Piece]:
        raise UserError(f"{self.spec} holds token ids (data.ids_field = {self.ids_field!r}), not text")

    def describe(self) -> str:
        where = f"Hugging Face dataset {self.spec[3:]} (streamed)" if self.spec.startswith("hf:") else f"{self.spec}"
        return f"pre-tokenised rows of {where}, column {self.ids_field!r}"


def open_source(source: str, text_field: str, builtin_docs: int, skip_undecodable: bool = False,
                ids_field: str = "") -> Source:
    """The source a data spec names (the module docstring lists the specs); with `ids_field`, its
    rows are token ids."""
    if ids_field:
        if source == "builtin":
            raise UserError("the built-in corpus is text: leave data.ids_field empty, or give a pre-tokenised --data")
        return TokenRowsSource(source, ids_field)
    if source == "builtin":
        return BuiltinSource(builtin_docs)
    if source.startswith("hf:"):
        return HubSource(source[3:], text_field)
    return LocalSource(Path(source).expanduser(), text_field, skip_undecodable)


def source_identity(source: str, text_field: str, builtin_docs: int, skip_undecodable: bool = False) -> dict:
    """What a token cache of this spec is read from (Source.identity)."""
    return open_source(source, text_field, builtin_docs, skip_undecodable).identity()


def iter_pieces(source: str, text_field: str, builtin_docs: int, skip_undecodable: bool = False,
                note: Callable = _print) -> Iterator[Piece]:
    """Every piece of the spec's source; `note` hears about replaced bytes and skipped files."""
    return open_source(source, text_field, builtin_docs, skip_undecodable).pieces(note)


def describe_source(source: str, builtin_docs: int) -> str:
    """The spec's source in words."""
    return open_source(source, "text", builtin_docs).describe()


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


# ---------------------------------------------------------------------------------- file formats


def jsonl_rows(path: Path, expected: str, errors: str = "strict") -> Iterator[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a .jsonl file; a line that is not a JSON
    object is refused in one line naming it and `expected`, what a row should be."""
    with open(path, encoding="utf-8", errors=errors) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{i} is not valid JSON ({e.msg}); expected {expected}") from None
            if not isinstance(row, dict):
                raise UserError(f"{path}:{i} is not a JSON object; expected {expected}")
            yield i, row


def parquet_rows(path: Path, text_column: str | None = None) -> Iterator:
    """The rows of a .parquet file as dicts or, given `text_column`, that column's values (which must
    be text); an unreadable file is refused in one line."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        if text_column is not None:
            _check_text_column(path, pf.schema_arrow, text_column)
        columns = None if text_column is None else [text_column]
        for batch in pf.iter_batches(batch_size=1024, columns=columns):
            yield from batch.to_pylist() if text_column is None else batch.column(0).to_pylist()
    except pa.ArrowException as e:
        raise UserError(f"{path} is not a readable parquet file: {e}") from None


def _check_text_column(path: Path, schema, name: str) -> None:
    import pyarrow as pa

    if name not in schema.names:
        raise UserError(f"{path} has no column {name!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(name).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise UserError(f"{path}: column {name!r} holds {kind}, not text")


# ---------------------------------------------------------------------------------- token rows

RowBatch = tuple[np.ndarray, np.ndarray]  # lengths of k rows, their ids one after another
ROW_BATCH = 1024  # rows per batch read from a .jsonl file or the Hub


def _row_files(root: Path) -> list[Path]:
    """The files a pre-tokenised spec names, in row order: a save_to_disk folder's arrow files (a
    DatasetDict's train split), or .parquet / .jsonl files."""
    if not root.exists():
        raise UserError(f"data path not found: {root}")
    if root.is_dir() and (root / "dataset_dict.json").is_file():  # a DatasetDict: its train split, as 5-dollar-llm reads it
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        if "train" not in splits:
            raise UserError(f"{root} is a dataset with splits {', '.join(splits) or 'none'}, none named train")
        return _row_files(root / "train")
    if root.is_dir() and (root / "state.json").is_file():  # datasets' save_to_disk: shards listed in order
        try:
            names = [f["filename"] for f in json.loads((root / "state.json").read_text())["_data_files"]]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{root / 'state.json'} is not the state of a saved dataset") from None
        return [root / n for n in names]
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in (".parquet", ".jsonl"))
    if not files or any(f.suffix not in (".parquet", ".jsonl") for f in files):
        raise UserError(f"{root}: pre-tokenised rows come from a save_to_disk folder or .parquet / .jsonl files")
    return files


def _file_rows(path: Path, field: str) -> Iterator[RowBatch]:
    import pyarrow as pa

    try:
        if path.suffix == ".jsonl":
            yield from _jsonl_id_rows(path, field)
            return
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            _check_ids_column(path, pf.schema_arrow, field)
            batches = (b.column(0) for b in pf.iter_batches(batch_size=ROW_BATCH, columns=[field]))
        else:  # an arrow shard of save_to_disk (Arrow's streaming format)
            reader = pa.ipc.open_stream(pa.memory_map(str(path)))
            _check_ids_column(path, reader.schema, field)
            batches = (b.column(field) for b in reader)
        for column in batches:
            yield _list_rows(column, path)
    except pa.ArrowException as e:
        raise UserError(f"{path} is not a readable dataset file: {e}") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}") from None


def _check_ids_column(path: Path, schema, field: str) -> None:
    import pyarrow as pa

    if field not in schema.names:
        raise UserError(f"{path} has no column {field!r} (columns: {', '.join(schema.names)}): not pre-tokenised "
                        "rows; for text leave data.ids_field empty")
    kind = schema.field(field).type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)) \
            or not pa.types.is_integer(kind.value_type):
        raise UserError(f"{path}: column {field!r} holds {kind}, not lists of token ids")


def _list_rows(column, where) -> RowBatch:
    import pyarrow.compute as pc

    if column.null_count:
        raise UserError(f"{where}: a row of the ids column is empty (null)")
    return pc.list_value_length(column).to_numpy().astype(np.int64), column.flatten().to_numpy().astype(np.int64)


def _id_list(ids: object, where: str, field: str) -> np.ndarray:
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError(f"{where}: {field!r} holds {type(ids).__name__}, not a list of token ids")
    return np.asarray(ids, dtype=np.int64)


def _batched(rows: Iterator[np.ndarray]) -> Iterator[RowBatch]:
    batch: list[np.ndarray] = []
    for r in rows:
        batch.append(r)
        if len(batch) == ROW_BATCH:
            yield np.array([len(b) for b in batch]), np.concatenate(batch)
            batch = []
    if batch:
        yield np.array([len(b) for b in batch]), np.concatenate(batch)


def _jsonl_id_rows(path: Path, field: str) -> Iterator[RowBatch]:
    expected = f"a JSON object with a {field!r} list of token ids"

    def rows():
        for i, row in jsonl_rows(path, expected):
            if field not in row:
                raise UserError(f"{path}:{i} has no {field!r} (fields: {', '.join(row)}): not pre-tokenised rows; "
                                "for text leave data.ids_field empty")
            yield _id_list(row[field], f"{path}:{i}", field)

    return _batched(rows())


def _hub_rows(spec: str, field: str) -> Iterator[RowBatch]:
    name, stream = _hub_stream(spec)

    def rows():
        while True:
            try:
                row = next(stream)
            except StopIteration:
                return
            except Exception as e:
                raise _hub_failure(name, e) from None
            if field not in row:
                raise UserError(f"dataset {name!r} has no {field!r} field (fields: {', '.join(row)}): not pre-tokenised "
                                "rows; for text leave data.ids_field empty")
            yield _id_list(row[field], f"dataset {name!r}", field)

    return _batched(rows())
