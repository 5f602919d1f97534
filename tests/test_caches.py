"""Caches that survive: concurrent builders, truncated files, full disks and caches of other data.

Every cache the project keeps (token caches, the trained BPE, visual tokens, FID statistics) is
built once by one process into a partial path renamed into place, and checked against what it
claims before it is used."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import LLM_DEBUG, ROOT, TINY_LLM, assert_one_line_error, run_script
from llm import data as llm_data
from llm import tokenizer as llm_tokenizer
from llm.data import TextDataConfig, prepare_data
from shared.cache import cache_root
from shared.errors import UserError
from shared.images import ImageSet

ENV = {"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
SMALL = dict(source="builtin", builtin_docs=300, tokenizer="bpe:400", seq_len=32, val_fraction=0.05)


def partials(root: Path) -> list[Path]:
    return sorted(root.rglob("*.partial*"))


def token_hash(cache) -> str:
    return hashlib.sha256(np.asarray(cache.tokens("train")).tobytes() + np.asarray(cache.tokens("val")).tobytes()).hexdigest()


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


# ------------------------------------------------------------------------------ concurrent builders

# a run in a child process: it says it is ready, waits for the go file, then builds the cache with a
# source slowed down so that the two builds overlap (the second starts while the first streams)
CHILD = r"""
import hashlib, pathlib, sys, time
import numpy as np
import llm.data as d
ready, go = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
original = d.iter_pieces
def slow(*args, **kwargs):
    for piece in original(*args, **kwargs):
        time.sleep(0.005)
        yield piece
d.iter_pieces = slow
ready.touch()
while not go.exists():
    time.sleep(0.005)
cache = d.prepare_data(d.TextDataConfig(**%r))
t = np.asarray(cache.tokens("train")).tobytes() + np.asarray(cache.tokens("val")).tobytes()
print("dir", cache.dir, "sha", hashlib.sha256(t).hexdigest(), "bpe", cache.tokenizer.fingerprint)
"""


def test_two_processes_building_one_token_cache_build_it_once(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("BLUEBERRY_CACHE", str(root))
    env = {**os.environ, "PYTHONPATH": str(ROOT), **ENV}
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CHILD % SMALL, str(tmp_path / f"ready{i}"), str(go)], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.05)
    go.touch()  # both start at once: each finds no tokenizer and no token cache
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    logs = "".join(out for out, _ in outs)
    assert logs.count("training a byte-level BPE") == 1, logs  # one process trained it, the other read it
    assert logs.count("tokenising") == 1, logs  # one process built the token cache, the other read it
    results = {line for out, _ in outs for line in out.splitlines() if line.startswith("dir ")}
    assert len(results) == 1, results  # the same folder, tokens and tokenizer in both
    where = Path(results.pop().split()[1])
    assert not partials(root) and (where / "meta.json").is_file()
    again = prepare_data(TextDataConfig(**SMALL), log=lambda *_: None)
    assert again.dir == where and not list(where.parent.glob("*.partial*"))


# ------------------------------------------------------------------------------ damaged token caches


def test_a_token_cache_whose_files_do_not_match_its_meta_is_rebuilt_not_mapped(tmp_path, monkeypatch):
    monkeypatch.setenv("BLUEBERRY_CACHE", str(tmp_path / "cache"))
    first = prepare_data(TextDataConfig(**SMALL), log=lambda *_: None)
    want, where = token_hash(first), first.dir
    del first
    (where / "train.bin").write_bytes(b"")  # the state: "complete" in meta.json, a 0-byte train.bin
    (where.parent / f"{where.name}.partial").mkdir()  # leftovers of killed builds, the old name and the new
    (where.parent / f"{where.name}.partial-99999").mkdir()
    logs = []
    again = prepare_data(TextDataConfig(**SMALL), log=logs.append)
    assert token_hash(again) == want and again.dir == where
    assert any("train.bin holds 0 bytes" in line and "building it again" in line for line in logs), logs
    assert not partials(tmp_path / "cache")
    (where / "meta.json").write_text("{not json")  # a torn meta.json: rebuilt too, not "delete it"
    assert token_hash(prepare_data(TextDataConfig(**SMALL), log=logs.append)) == want


def test_a_damaged_trained_bpe_is_trained_again(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BLUEBERRY_CACHE", str(tmp_path / "cache"))
    fingerprint = prepare_data(TextDataConfig(**SMALL), log=lambda *_: None).tokenizer.fingerprint
    [bpe] = (tmp_path / "cache" / "tokenizers").glob("bpe400-*.json")
    bpe.write_text(bpe.read_text()[:100])  # cut short
    capsys.readouterr()
    assert prepare_data(TextDataConfig(**SMALL), log=lambda *_: None).tokenizer.fingerprint == fingerprint
    assert "training it again" in capsys.readouterr().out


def test_a_users_cache_dir_is_rebuilt_only_when_it_holds_nothing_else(tmp_path):
    mine = tmp_path / "mine"
    cfg = TextDataConfig(**SMALL, cache_dir=str(mine))
    want = token_hash(prepare_data(cfg, log=lambda *_: None))
    (mine / "val.bin").write_bytes(b"\0" * 10)  # only a token cache's files: ours to rebuild
    assert token_hash(prepare_data(cfg, log=lambda *_: None)) == want
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("the user's own file")
    with pytest.raises(UserError) as e:
        prepare_data(TextDataConfig(**SMALL, cache_dir=str(theirs)), log=lambda *_: None)
    msg = one_line(e)
    assert str(theirs) in msg and "notes.txt" in msg and "delete" not in msg  # never tell a user to delete their files
    assert (theirs / "notes.txt").read_text() == "the user's own file" and not partials(tmp_path)


# ------------------------------------------------------------------------------ failed writes


def full_disk(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_a_token_cache_build_leaves_nothing_and_keeps_the_old_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BLUEBERRY_CACHE", str(tmp_path / "cache"))
    cfg = {**SMALL, "val_tokens": 200}  # validation fills early: a build for 2,000 training tokens stops there
    short = prepare_data(TextDataConfig(**cfg, max_tokens=2000), log=lambda *_: None)
    assert not short.meta["complete"]
    want, where = token_hash(short), short.dir
    flush = llm_data._Writer.flush

    def fills_up(self):  # some training tokens reach the disk, then it is full
        if self.pending and self.f.name.endswith("train.bin"):
            self.f.write(b"\0" * 1000)
            full_disk()
        flush(self)

    monkeypatch.setattr(llm_data._Writer, "flush", fills_up)
    with pytest.raises(UserError) as e:
        prepare_data(TextDataConfig(**cfg), log=lambda *_: None)  # the whole source: a longer build
    msg = one_line(e)
    assert "No space left on device" in msg and str(where) in msg and "previous cache is kept" in msg
    assert not partials(tmp_path / "cache")
    monkeypatch.setattr(llm_data._Writer, "flush", flush)
    logs = []
    kept = prepare_data(TextDataConfig(**cfg, max_tokens=2000), log=logs.append)
    assert token_hash(kept) == want and not logs  # the old cache still serves, untouched


def test_a_full_disk_while_saving_the_trained_bpe_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("BLUEBERRY_CACHE", str(tmp_path / "cache"))
    train = llm_tokenizer.train_bpe

    class Full:
        def __init__(self, tok):
            self.tok = tok

        def save(self, path):  # what tokenizers raises: a bare Exception with the OS error in words
            Path(path).write_text("{")
            raise Exception("No space left on device (os error 28)")

    monkeypatch.setattr(llm_tokenizer, "train_bpe", lambda texts, size: Full(train(texts, size)))
    with pytest.raises(UserError) as e:
        prepare_data(TextDataConfig(**SMALL), log=lambda *_: None)
    assert "No space left on device" in one_line(e)
    assert not list((tmp_path / "cache" / "tokenizers").glob("bpe400-*.json")) and not partials(tmp_path)


@pytest.mark.parametrize("error", [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),  # torch.save
    Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
])
def test_a_failed_cache_write_is_one_line_and_keeps_the_previous_file(tmp_path, error):
    from shared.cache import writing

    path = tmp_path / "stats.npz"
    path.write_text("previous")
    with pytest.raises(UserError) as e:
        with writing(path, "the FID statistics") as partial:
            partial.write_text("half")
            raise error
    assert "the FID statistics" in one_line(e) and str(path) in str(e.value)
    assert path.read_text() == "previous" and sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]


def test_a_full_disk_while_saving_a_token_file_is_one_line(tmp_path, monkeypatch):
    from safetensors import SafetensorError
    from vqvae import token_file

    ident = {"fingerprint": "f" * 16, "codebook_size": 16, "grid_shape": [2, 2], "image_size": 4, "source": "test"}
    args = (torch.zeros(3, 2, 2), torch.zeros(3), ("a",), ident, "three images")
    path = token_file.save_tokens(tmp_path / "train.safetensors", *args)

    def full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(token_file, "save_file", full)
    with pytest.raises(UserError) as e:
        token_file.save_tokens(path, torch.ones(3, 2, 2), *args[1:])
    assert "No space left on device" in one_line(e)
    assert [p.name for p in tmp_path.iterdir()] == ["train.safetensors"]
    assert int(token_file.load_tokens(path).tokens.sum()) == 0  # the previous file is kept


# ------------------------------------------------------------------------------ cache folders


def test_an_empty_blueberry_cache_means_the_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("BLUEBERRY_CACHE", "")
    assert cache_root() == Path(".cache/blueberry")  # not the current folder


@pytest.mark.slow
def test_blueberry_cache_or_data_cache_dir_at_a_file_is_one_line(tmp_path, monkeypatch):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    monkeypatch.setenv("BLUEBERRY_CACHE", str(a_file))
    with pytest.raises(UserError, match="BLUEBERRY_CACHE"):
        cache_root()
    proc = run_script("train_llm.py", "--config", LLM_DEBUG, *TINY_LLM, "train.budget=256", cwd=tmp_path, env_extra=ENV)
    assert_one_line_error(proc, "BLUEBERRY_CACHE", "not a folder")
    proc = run_script("train_llm.py", "--config", LLM_DEBUG, *TINY_LLM, "train.budget=256", f'data.cache_dir="{a_file}"',
                      "--experiment_name", "b", cwd=tmp_path, env_extra={**ENV, "BLUEBERRY_CACHE": str(tmp_path / "c")})
    assert_one_line_error(proc, "data.cache_dir", "not a folder")


# ------------------------------------------------------------------------------ visual tokens and FID


class FakeVQ:
    """The parts of a VQTokenizer that encode_images uses: a 2x2 grid of pixel values mod 16."""
    fingerprint, batch_size, grid_shape, codebook_size = "0123456789abcdef", 4, (2, 2), 16

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, :2, :2].long() % 16

    def identity(self) -> dict:
        return {"fingerprint": self.fingerprint, "codebook_size": 16, "grid_shape": [2, 2], "image_size": 4,
                "source": "fake"}


def image_set(n: int, seed: int = 0) -> ImageSet:
    g = torch.Generator().manual_seed(seed)
    return ImageSet(torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8),
                    torch.randint(0, 3, (n,), generator=g), ("a", "b", "c"), f"{n} random images")


@pytest.mark.parametrize("tamper", ["fewer rows", "other labels", "other tokenizer", "truncated"])
def test_a_visual_token_cache_that_does_not_fit_the_images_is_encoded_again(tmp_path, monkeypatch, capsys, tamper):
    from multimodal.data import encode_images
    from vqvae.token_file import load_tokens, save_tokens

    monkeypatch.setenv("BLUEBERRY_CACHE", str(tmp_path / "cache"))
    data, vq = image_set(10), FakeVQ()
    want = encode_images(data, "train", vq, progress=False)
    files = sorted((tmp_path / "cache" / "multimodal-tokens").rglob("*.safetensors"))
    assert files
    for f in files:  # a cache with the right name holding other rows
        t = load_tokens(f)
        if tamper == "truncated":
            f.write_bytes(f.read_bytes()[:50])
            continue
        tokens, labels, ident = t.tokens.long(), t.labels, dict(t.tokenizer)
        if tamper == "fewer rows":
            tokens, labels = tokens[:6], labels[:6]
        elif tamper == "other labels":
            labels = (labels + 1) % 3
        else:
            ident["fingerprint"] = "another"
        save_tokens(f, tokens, labels, t.classes, ident, t.data)
    capsys.readouterr()
    got = encode_images(data, "train", vq, progress=False)
    out = capsys.readouterr().out
    assert got.codes.shape == want.codes.shape == (10, 2, 2, 2) and torch.equal(got.codes, want.codes)
    assert "encoding the images again" in out and "encode_vqvae" not in out
    assert not partials(tmp_path / "cache")
    capsys.readouterr()
    encode_images(data, "train", vq, progress=False)  # now whole again: read, not encoded
    assert "encoding" not in capsys.readouterr().out


def test_fid_statistics_cache_is_checked_and_computed_again(tmp_path, monkeypatch, capsys):
    from shared.fid import reference_stats

    monkeypatch.setenv("BLUEBERRY_CACHE", str(tmp_path / "cache"))
    images = image_set(20).images
    calls = []

    def extractor(x):  # stands in for Inception: 6-d features of the pixels
        calls.append(len(x))
        return x.flatten(1)[:, :6].double().numpy()

    want = reference_stats(images, "ref set", extractor)
    [path] = (tmp_path / "cache" / "fid").glob("*.npz")
    path.write_bytes(path.read_bytes()[:100])  # torn
    got = reference_stats(images, "ref set", extractor)
    assert len(calls) == 2 and np.array_equal(got["sigma"], want["sigma"])
    np.savez(path, mu=np.zeros(6), sigma=np.zeros((5, 5)), n=np.array(20))  # another shape
    assert reference_stats(images, "ref set", extractor)["sigma"].shape == (6, 6) and len(calls) == 3
    reference_stats(images, "ref set", extractor)
    assert len(calls) == 3 and "computing them again" in capsys.readouterr().out
    assert not partials(tmp_path / "cache")
