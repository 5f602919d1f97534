"""Inputs checked against what they claim to be: image splits of the model's size, classes with
training images, image folders with any file names, a decoded-image cache that is built once and
checked when read, text files that are UTF-8 text, speedrun records of finite numbers, and
generation that says when the context cuts it short."""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import LLM_DEBUG, ROOT, TINY_LLM, assert_one_line_error, run_script
from llm import sources
from llm.generate import generate, new_token_budget
from llm.model import Decoder, DecoderConfig
from llm.speedrun import SCHEMA, leaderboard, load_record, read_run, write_leaderboard
from shared.errors import UserError
from shared.images import load_images, load_train_test, read_image_files

ENV = {"OMP_NUM_THREADS": "1"}


def image(path: Path, size: int, value: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path)


def folder(root: Path, sizes: dict[str, int], classes=("a", "b"), n: int = 3) -> Path:
    for split, size in sizes.items():
        for c in classes:
            for i in range(n):
                image(root / split / c / f"{i}.png", size, 40 * i)
    return root


def fs_path(parent: Path, *names: bytes) -> Path:
    """A path whose last parts are raw bytes (not necessarily UTF-8)."""
    return Path(os.fsdecode(os.fsencode(str(parent)) + b"".join(b"/" + n for n in names)))


# ------------------------------------------------------------------------------- images


def test_splits_of_another_size_are_refused_in_one_line_before_any_work(tmp_path):
    data = folder(tmp_path / "data", {"train": 32, "test": 64})
    with pytest.raises(UserError, match=r"the test split of .*data holds 64x64 images but the train split holds 32x32"):
        load_train_test(str(data))
    same = folder(tmp_path / "same", {"train": 32, "test": 32})
    with pytest.raises(UserError, match=r"the train split of .*same holds 32x32 images but the model expects 16x16"):
        load_train_test(str(same), shape=(3, 16, 16))
    with pytest.raises(UserError, match=r"32x32 with 3 channels images but the model expects 32x32 with 1 channel"):
        load_train_test(str(same), shape=(1, 32, 32))
    train, test = load_train_test(str(same), shape=(3, 32, 32))
    assert train.images.shape[1:] == test.images.shape[1:] == (3, 32, 32)

    # flow matching trained its whole budget on 32x32 and died at evaluation, with no checkpoint
    proc = run_script("train_flow_matching.py", "--config", str(ROOT / "configs" / "flow_matching" / "debug.toml"),
                      "--data", str(data), "--runs_dir", str(tmp_path / "runs"), "train.budget=64", "train.batch_size=4",
                      cwd=tmp_path, env_extra=ENV)
    assert_one_line_error(proc, "test split", "64x64", "32x32")
    assert not list((tmp_path / "runs").rglob("metrics.jsonl"))  # nothing trained


def test_a_class_with_no_training_images_is_refused_or_dropped_with_a_note(tmp_path, capsys):
    data = folder(tmp_path / "data", {"train": 8, "test": 8}, classes=("a", "b", "c"))
    for f in (data / "train" / "b").iterdir():
        f.unlink()
    (data / "train" / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(UserError, match=r"the class folder 'b' under .*train has no training images.*drop_empty_classes"):
        load_train_test(str(data))
    train, test = load_train_test(str(data), drop_empty_classes=True)
    assert "left out 1 class folder with no training images" in capsys.readouterr().out
    assert train.classes == test.classes == ("a", "c") and train.dropped == ("b",)
    assert train.labels.tolist() == [0, 0, 0, 1, 1, 1] and test.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert len(test) == 6  # b's test images went with it
    one = folder(tmp_path / "samples", {"": 8}, classes=("x",))
    (one / "y").mkdir()
    with pytest.raises(UserError, match="'y' .* has no images"):
        load_images(str(one), "all")


def test_file_and_class_names_that_are_not_utf8_are_read(tmp_path, capsys):
    data = folder(tmp_path / "data", {"train": 8, "test": 8})
    try:
        image(fs_path(data / "train" / "a", b"caf\xe9.png"), 8, 200)
        for split in ("train", "test"):
            for i in range(2):
                image(fs_path(data / split, b"na\xefve", f"{i}.png".encode()), 8, 100)
    except OSError:
        pytest.skip("this file system refuses names that are not UTF-8")
    train, test = load_train_test(str(data))
    assert train.classes == test.classes == ("a", "b", "na\ufffdve") and len(train) == 9
    out = capsys.readouterr().out
    assert "b'na\\xefve'" in out and "is not UTF-8" in out
    train.description.encode("utf-8")  # printable
    assert load_images(str(data), "train").images.shape == (9, 3, 8, 8)  # the cache reads back


def test_the_decoded_image_cache_is_built_once_and_checked_when_read(tmp_path, monkeypatch, capsys):
    data = folder(tmp_path / "data", {"train": 8}, n=4)
    opened = []
    real_open = Image.open

    def slow_open(*args, **kw):
        opened.append(args[0])
        time.sleep(0.02)  # long enough for the second run to arrive while the first decodes
        return real_open(*args, **kw)

    monkeypatch.setattr(Image, "open", slow_open)
    results = []
    threads = [threading.Thread(target=lambda: results.append(load_images(str(data), "train"))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 2 and len(opened) == 8  # decoded once, by one of the two
    assert torch.equal(results[0].images, results[1].images)
    caches = list((Path(os.environ["BLUEBERRY_CACHE"]) / "images").glob("train-all-*.pt"))
    cache = next(c for c in caches if torch.equal(torch.load(c)["images"], results[0].images))

    for damage in ({"images": torch.zeros(1, 3, 8, 8, dtype=torch.uint8)}, {"labels": torch.zeros(8)}, b"garbage"):
        if isinstance(damage, bytes):
            cache.write_bytes(damage)
        else:
            torch.save(damage, cache)
        capsys.readouterr()
        again = load_images(str(data), "train")
        assert torch.equal(again.images, results[0].images)
        assert "decoding again" in capsys.readouterr().out


def test_caption_of_a_folder_says_it_is_a_folder(tmp_path):
    image(tmp_path / "pics" / "cat.png", 8)
    with pytest.raises(UserError, match=r"pics is a folder, not an image file: name its images"):
        read_image_files([str(tmp_path / "pics")], 8)
    with pytest.raises(UserError, match="image not found"):
        read_image_files([str(tmp_path / "missing.png")], 8)


# ------------------------------------------------------------------------------- text


def texts(source: str, **kw) -> list[str]:
    return [p[0] for p in sources.iter_pieces(source, "text", 0, **kw)]


def test_a_binary_file_in_a_corpus_is_refused_or_skipped_with_a_note(tmp_path):
    (tmp_path / "good.txt").write_text("a real document\n" * 100)
    (tmp_path / "random.txt").write_bytes(random.Random(0).randbytes(50_000))  # was 59% of the characters read
    with pytest.raises(UserError, match=r"random\.txt is not UTF-8 text: .* NUL bytes and 4\d\.\d% of bytes undecodable"):
        texts(str(tmp_path))
    notes = []
    assert texts(str(tmp_path), skip_undecodable=True, note=notes.append) == ["a real document\n" * 100]
    assert len(notes) == 1 and "skipped" in notes[0] and "random.txt" in notes[0]
    (tmp_path / "random.txt").unlink()
    (tmp_path / "nul.txt").write_bytes(b"valid UTF-8 but \x00 binary" * 10)  # NUL bytes decode fine, yet are no text
    with pytest.raises(UserError, match=r"nul\.txt is not UTF-8 text: 10 NUL bytes"):
        texts(str(tmp_path))
    (tmp_path / "nul.txt").unlink()
    latin = tmp_path / "latin1.txt"  # another encoding throughout: 2 bytes in 11 undecodable
    latin.write_bytes("caf\xe9 cr\xe8me ".encode("latin-1") * 50)
    with pytest.raises(UserError, match=r"latin1\.txt .*18\.2% of bytes undecodable.*data\.skip_undecodable=true"):
        texts(str(tmp_path))
    plain = sources.source_identity(str(tmp_path), "text", 0)
    assert sources.source_identity(str(tmp_path), "text", 0, skip_undecodable=True) != plain  # another cache


def test_a_few_undecodable_bytes_are_replaced_and_named_in_txt_and_jsonl_alike(tmp_path):
    (tmp_path / "speech.txt").write_bytes(b"the \xbd cent decrease " * 2 + b"and plain text after it. " * 40)
    (tmp_path / "rows.jsonl").write_bytes(b'{"text": "caf\xe9 au lait"}\n' + b'{"text": "fine"}\n' * 20)
    notes = []
    got = texts(str(tmp_path), note=notes.append)
    assert got[0] == "caf\ufffd au lait" and got[-1].startswith("the \ufffd cent")
    assert notes == [f"note: {tmp_path / 'rows.jsonl'}: 1 undecodable byte (not UTF-8) replaced by U+FFFD",
                     f"note: {tmp_path / 'speech.txt'}: 2 undecodable bytes (not UTF-8) replaced by U+FFFD"]
    texts(str(tmp_path), note=notes.append)
    assert len(notes) == 2  # a file read again (BPE training, then the cache) is named once


def test_the_real_corpus_names_its_files_that_are_not_utf8(data_dir):
    notes = []
    texts(str(data_dir / "text" / "state_union"), note=notes.append)
    named = {n.split(": ")[1].split("/state_union/")[1]: n.split(": ")[2] for n in notes}
    assert named["1954-Eisenhower.txt"] == "2 undecodable bytes (not UTF-8) replaced by U+FFFD"
    assert set(named) == {"1954-Eisenhower.txt", *(f"{y}-Nixon.txt" for y in range(1970, 1975))}


def test_train_llm_refuses_a_binary_file_in_one_line(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("some words of text\n" * 500)
    (tmp_path / "corpus" / "blob.txt").write_bytes(random.Random(1).randbytes(20_000))
    proc = run_script("train_llm.py", "--config", LLM_DEBUG, "--data", str(tmp_path / "corpus"), *TINY_LLM,
                      "train.budget=512", "--runs_dir", str(tmp_path / "runs"), cwd=tmp_path, env_extra=ENV)
    assert_one_line_error(proc, "blob.txt is not UTF-8 text", "skip_undecodable")


# ------------------------------------------------------------------------------- speedrun records


def record(path: Path, losses=(3.0, 3.1), **fields) -> Path:
    runs = [{"seed": i, "loss": v, "accuracy": 0.5, "perplexity": 20.0, "train_time_s": 10.0 + i} for i, v in enumerate(losses)]
    rec = {"schema": SCHEMA, "label": path.stem, "preset": "debug", "budget": 2048, "overrides": [],
           "hardware": {"device": "cpu", "cpu": "x86_64", "cpu_threads": 1}, "runs": runs, **fields}
    path.write_text(json.dumps(rec))
    return path


def with_run(**figures) -> dict:
    return {"runs": [{"seed": 0, "loss": 3.0, "accuracy": 0.5, "perplexity": 20.0, "train_time_s": 10.0, **figures}]}


@pytest.mark.parametrize("fields,named", [
    (with_run(loss=float("nan")), "runs[0].loss is NaN"),
    (with_run(train_time_s=float("inf")), "runs[0].train_time_s is Infinity"),
    (with_run(loss="2.5"), "runs[0].loss is \"2.5\""),
    (with_run(loss=True), "runs[0].loss is true"),
    (with_run(accuracy=float("nan")), "runs[0].accuracy is NaN"),
    ({"runs": []}, "runs is [], not a non-empty list"),
    ({"runs": ["x"]}, "runs[0] is \"x\", not a table"),
    ({"budget": "8M"}, "budget is \"8M\", not a whole number"),
    ({"hardware": "cpu"}, "hardware is \"cpu\", not a table"),
    ({"preset": 5}, "preset is 5, not a non-empty string"),
    ({"label": None}, "label is null"),
    ({"overrides": "x"}, "overrides is \"x\", not a list of strings"),
])
def test_records_with_nan_or_malformed_fields_are_refused_naming_the_field(tmp_path, fields, named):
    path = record(tmp_path / "bad.json", **fields)
    with pytest.raises(UserError, match="bad.json is not a valid speedrun record: " + named.replace("[", r"\[")
                       .replace("]", r"\]")):
        load_record(path)


def test_the_leaderboard_ranks_valid_records_and_names_the_left_out_ones(tmp_path):
    good = record(tmp_path / "good.json")
    record(tmp_path / "nan.json", losses=(float("nan"), 2.0))  # sorted first of all, by NaN, before
    record(tmp_path / "budget.json", budget="8M")  # the leaderboard died with a TypeError
    (tmp_path / "torn.json").write_text('{"schema": 1, "runs": [')
    board = leaderboard(tmp_path)
    measured = board.split("## Reference")[0]  # 5-dollar-llm's published records follow, never ranked
    ranked = [line for line in measured.splitlines() if line[:3] in {f"| {k}" for k in range(1, 10)}]
    assert len(ranked) == 1 and ranked[0].startswith("| 1 | debug | good |")
    assert "## Left out" in board
    assert "- `nan.json`: runs[0].loss is NaN, not a finite number" in board
    assert "- `budget.json`: budget is \"8M\", not a whole number of tokens" in board and "- `torn.json`: corrupt JSON" in board
    notes = []
    write_leaderboard(tmp_path, note=notes.append)
    assert len(notes) == 3 and all(n.startswith("note: left ") and "out of the leaderboard: " in n for n in notes)
    proc = run_script("speedrun.py", "--compare", str(good), "--candidate", str(tmp_path / "nan.json"), cwd=tmp_path)
    assert_one_line_error(proc, "nan.json", "runs[0].loss is NaN")  # was compared: p = nan


def test_a_run_that_ended_with_a_nan_loss_is_not_recorded(tmp_path):
    run = tmp_path / "seed0"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"final_eval": {"loss": math.nan, "accuracy": 0.1, "perplexity": math.nan},
                                                  "train_time_s": 1.0, "steps": 2}))
    (run / "metrics.jsonl").write_text(json.dumps({"split": "eval", "units": 2, "loss": math.nan}) + "\n")
    (run / "config.toml").write_text("[train]\nseed = 0\n")
    with pytest.raises(UserError, match=r"seed0 cannot be recorded: loss is NaN, not a finite number"):
        read_run(run, 0)


# ------------------------------------------------------------------------------- generation


def test_generation_past_the_context_is_noted_not_cut_silently():
    assert new_token_budget(10, 20, 64) == (10, "")
    room, note = new_token_budget(200, 20, 64)
    assert room == 44 and note == ("note: the prompt's 20 tokens leave room for 44 of the 200 new tokens asked "
                                   "(the model's context is 64): each sample stops there")
    torch.manual_seed(0)
    model = Decoder(DecoderConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden=64, vocab_size=64), 16)
    steps = list(generate(model, torch.zeros(1, 10, dtype=torch.long), 100, temperature=0))
    assert len(steps) == new_token_budget(100, 10, 16)[0] == 6
