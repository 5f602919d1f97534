"""Where derived data lives (token caches, decoded images, FID statistics, downloads), and how a
cache is built: once, by one process, atomically.

    value = build_once(path, read, build, "the FID statistics")

`read()` returns the cache's contents, None when it is missing, or raises `Stale(note)` when it
is there but does not match (a truncated file, another format; the note says so, and that it is
built again): a cache is checked against what it claims before it is used, never memory-mapped
blind. One that must not be rebuilt (a user's folder holding other files) raises UserError.
`build(partial)` writes the whole cache (a file or a folder) at `partial`; it is renamed over
`path` only when complete, so a reader sees the old cache or the new one, never half of one. Builders take an exclusive
lock on `<path>.lock` first: a second process waits for the first, then reads what it built.
A write that fails (a full disk: OSError 28, or the forms safetensors, tokenizers and torch
give it) is one line, with nothing left behind and the previous cache kept.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from .errors import UserError

T = TypeVar("T")
DEFAULT_ROOT = ".cache/blueberry"
# how libraries word a failed write whose OSError they swallowed (safetensors, tokenizers, torch's zip writer)
WRITE_FAILURES = ("no space left", "os error", "ioerror", "storagefull", "disk quota", "inline_container",
                  "file write failed", "unexpected pos")


def say(*args) -> None:
    print(*args, flush=True)  # notes reach a log file in order with the script's own lines


class Stale(Exception):
    """A cache that exists but does not match what it claims or what is asked of it: build it again.
    The message is the note a user reads, e.g. "the FID statistics X are unreadable: computing them again"."""


def cache_root() -> Path:
    """$BLUEBERRY_CACHE, or .cache/blueberry under the working directory (also when it is set but
    empty: Path("") would be the working directory itself)."""
    value = os.environ.get("BLUEBERRY_CACHE", "").strip()
    return check_folder(Path(value).expanduser() if value else Path(DEFAULT_ROOT),
                        f"BLUEBERRY_CACHE={value}" if value else f"the cache folder {DEFAULT_ROOT}")


def check_folder(path: Path, what: str) -> Path:
    """`path` unless it, or the nearest part of it that exists, is not a folder (then one line)."""
    for p in (path, *path.parents):
        if p.exists():  # follows links: a link to a folder is a folder
            if not p.is_dir():
                raise UserError(f"{what} is {'a file' if p == path else f'under the file {p}'}, not a folder: "
                                "point it at a folder")
            return path
    return path


def partial_path(path: Path) -> Path:
    """Where this process builds `path`: unique per builder, and named so that a later builder
    recognises it as a leftover."""
    return path.with_name(f"{path.name}.partial-{os.getpid()}")


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_partials(path: Path) -> None:
    """Leftovers of builds of `path` that were killed (the old `.partial` name too). Only under the
    lock: then no other process is building it."""
    for p in path.parent.glob(f"{glob.escape(path.name)}.partial*"):
        remove(p)


@contextmanager
def exclusive(path: Path, log: Callable = say) -> Iterator[bool]:
    """Hold the lock of `path` (`<path>.lock`, left in place: deleting a lock file races). The
    first process to ask builds; the others say once that they wait. Yields whether the lock is
    held (False on a file system without locks)."""
    lock = path.with_name(path.name + ".lock")
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        f = open(lock, "a")
    except OSError as e:
        raise UserError(f"cannot create {lock} ({e.strerror or e}): the cache folder must be writable") from None
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another process building {path} ...")
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # a file system without locks: builds stay atomic, only not exclusive
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            yield False
            return
        yield True  # closing the file releases the lock


def is_write_failure(e: BaseException) -> bool:
    """A write that failed for the disk's sake (full, over quota, read-only, gone), in any library's words."""
    return isinstance(e, OSError) or (isinstance(e, Exception) and not isinstance(e, UserError)
                                      and any(s in str(e).lower() for s in WRITE_FAILURES))


def write_failure(e: BaseException, what: str, path: Path, kept: bool) -> UserError:
    if isinstance(e, OSError) and e.strerror:
        inside = e.filename and str(e.filename).startswith(str(partial_path(path)))  # the partial's name says nothing
        reason = e.strerror + ("" if inside or not e.filename else f": {e.filename}")
    else:
        reason = " ".join(str(e).split())[:200] or type(e).__name__
    hint = "; free space on that disk or set BLUEBERRY_CACHE to a folder on another one" if (
        getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "space" in reason.lower()) else ""
    return UserError(f"could not write {what} {path} ({reason}); the partial build was removed"
                     + (", the previous cache is kept" if kept else "") + hint)


def install(partial: Path, path: Path) -> None:
    """Put a finished build in place: one rename for a file; for a folder, the old one is moved aside
    first (a folder cannot be renamed over another). Readers that find nothing meanwhile take the
    lock and wait; files already open or memory-mapped stay valid."""
    if (path.exists() or path.is_symlink()) and (partial.is_dir() or (path.is_dir() and not path.is_symlink())):
        old = path.with_name(f"{path.name}.partial-old-{os.getpid()}")
        os.replace(path, old)
        os.replace(partial, path)
        remove(old)
    else:
        os.replace(partial, path)


@contextmanager
def writing(path: Path, what: str) -> Iterator[Path]:
    """Yield a partial path to write `path` at; install it when the block succeeds. On any failure
    the partial is removed and `path` is untouched; a failed write becomes one line."""
    partial = partial_path(path)
    remove(partial)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield partial
        install(partial, path)
    except BaseException as e:
        remove(partial)
        if is_write_failure(e):
            raise write_failure(e, what, path, kept=path.exists()) from None
        raise


def build_once(path: Path, read: Callable[[], T | None], build: Callable[[Path], object], what: str,
               log: Callable = say) -> T:
    """The cache at `path`, built by one process at a time (see the module's docstring)."""
    try:
        found = read()
        if found is not None:
            return found
    except Stale:
        pass  # said below, under the lock: another process may be rebuilding it right now
    with exclusive(path, log) as held:
        try:
            found = read()  # another process may have built it while this one waited
            if found is not None:
                return found
        except Stale as e:
            log(str(e))  # its reason and what happens now
        if held:  # no other process is building it: what a killed one left goes
            remove_partials(path)
        with writing(path, what) as partial:
            build(partial)
        try:
            found = read()
        except Stale as e:
            found, reason = None, str(e)
        else:
            reason = "nothing there"
        if found is None:
            raise UserError(f"{what} {path} was just written but does not read back ({reason}); is the disk full?")
        return found
