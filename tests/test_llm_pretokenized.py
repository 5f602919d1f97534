"""5-dollar-llm's benchmark in Blueberry: pre-tokenised rows read in every stored form, their split
(datasets' train_test_split), their training order (torch's DataLoader) and their validation rows
and figures reproduced exactly, their step count, an exact resume, the options that reproduce
their optimiser, the comparison of the two presets by the harness, and bad input in one line."""

from __future__ import annotations

import json
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, run_script

from llm.data import TextDataConfig, open_text_data
from llm.model import Decoder, DecoderConfig
from llm.pretokenized import (
    LoaderOrder,
    RowBatches,
    train_test_split_indices,
    write_rows_dataset,
)
from llm.sources import TokenRowsSource
from llm.speedrun import ROOT, absolute_paths, leaderboard, load_record, record_problem
from llm.task import LanguageModelTask
from shared.blocks import apply_rope, rope_1d
from shared.checkpoint import resolve_checkpoint
from shared.muon import Muon, orthogonalize
from shared.optim import OptimConfig, lr_multiplier
from shared.trainer import TrainConfig, Trainer

ENV = {"OMP_NUM_THREADS": "1"}
SHAPE = ["model.n_layers=2", "model.d_model=64", "model.n_heads=2", "model.n_kv_heads=1", "model.mlp_hidden=128",
         "train.compile=false", "train.batch_size=4", "sample.max_new_tokens=4", "data.seq_len=32"]


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> Path:
    """The built-in corpus as 5-dollar-llm lays out its data: rows of 33 ids of a 400-token BPE,
    shuffled with seed 42, as parquet (and as a save_to_disk folder, `rows.parent / "disk"`)."""
    base = tmp_path_factory.mktemp("rows")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BLUEBERRY_CACHE", str(base / "cache"))
        write_rows_dataset("builtin", "bpe:400", 33, base / "parquet", log=lambda *_: None)
        if _has_datasets():
            write_rows_dataset("builtin", "bpe:400", 33, base / "disk", fmt="disk", log=lambda *_: None)
    return base / "parquet"


def _has_datasets() -> bool:
    try:
        import datasets  # noqa: F401
    except ImportError:
        return False
    return True


def rows_cfg(path: Path, **kw) -> TextDataConfig:
    args = dict(source=str(path), ids_field="input_ids", tokenizer=str(path / "tokenizer.json"), seq_len=32,
                split="train_test_split", val_fraction=0.1)  # 5dollar-88m's data table, at rows of 33
    return TextDataConfig(**{**args, **kw})


def stored(rows: Path) -> np.ndarray:
    return np.concatenate([ids.reshape(-1, 33) for _, ids in TokenRowsSource(str(rows), "input_ids").rows()])


# ------------------------------------------------------------------------------- their split and order


@pytest.mark.parametrize("n", [20_000, 1_234, 101])
def test_the_split_is_datasets_train_test_split(n):
    datasets = pytest.importorskip("datasets")
    theirs = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=0.1, seed=42)
    train, test = train_test_split_indices(n, 0.1, 42)
    assert train.tolist() == theirs["train"]["i"] and test.tolist() == theirs["test"]["i"]
    shuffled = datasets.Dataset.from_dict({"i": list(range(n))}).shuffle(seed=42)  # how their rows were shuffled
    assert shuffled["i"] == np.random.default_rng(42).permutation(n).tolist()


def their_loader_batches(n: int, epochs: int = 3, batch: int = 8) -> list[list[int]]:
    """What 5-dollar-llm's training loader yields, epoch by epoch (train_llm.py and training/trainer.py):
    train and validation loaders on one generator, 2 persistent workers, 3 warm-up batches from a
    dropped iterator, the validation loader first iterated after step 0."""
    from torch.utils.data import DataLoader

    g = torch.Generator()
    g.manual_seed(42)
    args = dict(batch_size=batch, num_workers=2, persistent_workers=True, generator=g)
    train, val = DataLoader(list(range(n)), shuffle=True, **args), DataLoader(list(range(30)), shuffle=False, **args)
    warm = iter(train)
    for _ in range(3):
        next(warm)
    out = []
    for e in range(epochs):
        seen = []
        for i, b in enumerate(train):
            seen.append(b.tolist())
            if e == 0 and i == 0:
                for j, _ in enumerate(val):
                    if j == 1:
                        break
        out.append([x for b in seen if len(b) == batch for x in b])  # their smaller last batch: skipped here
    return out


@pytest.mark.parametrize("n", [100, 40, 30])  # 40 and 30: an epoch ends inside their warm-up, or before step 0's evaluation
def test_the_order_is_their_dataloaders(n):
    order = LoaderOrder(n, 8, 42)
    ours = [[i for _ in range(n // 8) for i in order.next()[0].tolist()] for _ in range(3)]
    assert ours == their_loader_batches(n)


def test_stored_forms_read_the_same_rows(rows, tmp_path):
    want = stored(rows)
    assert want.shape[1] == 33 and len(want) > 1000
    lines = [json.dumps({"input_ids": r, "labels": r}) for r in want[:50].tolist()]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    assert np.array_equal(stored(tmp_path / "rows.jsonl"), want[:50])
    if _has_datasets():
        import datasets

        disk = rows.parent / "disk"
        assert np.array_equal(stored(disk), want)  # the same shuffle, written by datasets
        datasets.DatasetDict({"train": datasets.load_from_disk(str(disk))}).save_to_disk(str(tmp_path / "dict"))
        assert np.array_equal(stored(tmp_path / "dict"), want)  # a DatasetDict: its train split


def test_split_order_and_evaluation_reproduce_their_pipeline(rows, one_thread):
    """Their whole data path (load_from_disk, train_test_split, DataLoaders, evaluate_model) against
    ours on the same local copy: the same training batches, validation rows and figures."""
    datasets = pytest.importorskip("datasets")
    from torch.utils.data import DataLoader

    disk = rows.parent / "disk"
    parts = datasets.load_from_disk(str(disk)).train_test_split(test_size=0.1, seed=42)
    for part in parts.values():
        part.set_format(type="torch", columns=["input_ids", "labels"])
    g = torch.Generator()
    g.manual_seed(42)
    args = dict(batch_size=8, num_workers=2, persistent_workers=True, generator=g)
    train_loader, val_loader = DataLoader(parts["train"], shuffle=True, **args), DataLoader(parts["test"], **args)
    warm = iter(train_loader)
    for _ in range(3):
        next(warm)
    theirs, val = [], []
    for i, batch in enumerate(train_loader):
        theirs.append(batch["input_ids"])
        if i == 0:
            val = [b["input_ids"] for _, b in zip(range(100), val_loader)]
        if i == 5:
            break

    data = open_text_data(rows_cfg(disk), batch_size=8, seed=0, budget=10**6, log=lambda *_: None)
    for batch in theirs:
        x, y = data.train.next_batch()
        assert torch.equal(x, batch[:, :-1]) and torch.equal(y, batch[:, 1:])
    assert torch.equal(data.val, torch.cat(val)) and data.val.shape == (800, 33)
    assert data.identity["val_predictions"] == 800 * 32  # at 2,048 ids a row: 1,637,600

    torch.manual_seed(0)
    model = Decoder(DecoderConfig(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden=64,
                                  vocab_size=448, zero_init_out=False), 33).eval()
    ours = LanguageModelTask(data.val, data.tokenizer, eval_batch_size=8).evaluate(model)
    loss_sum = correct = count = 0
    with torch.no_grad():  # their training/evaluation.py, on the full rows
        for x in val:
            logits = model(x)[:, :-1]
            labels = x[:, 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
            loss_sum += loss.item() * labels.numel()
            count += labels.numel()
            correct += (logits.argmax(-1) == labels).sum().item()
    assert ours["loss"] == pytest.approx(loss_sum / count, abs=1e-5)
    assert ours["accuracy"] == pytest.approx(correct / count, abs=1.5 / count)
    assert ours["perplexity"] == pytest.approx(math.exp(min(loss_sum / count, 20)), rel=1e-5)


# ------------------------------------------------------------------------------- steps and resume


def tiny_model(vocab: int = 448, seq: int = 32) -> Decoder:
    torch.manual_seed(0)
    return Decoder(DecoderConfig(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, mlp_hidden=64, vocab_size=vocab,
                                 zero_init_out=False, embed_scale=True, merged_qkvo=True), seq)


FIVE_DOLLAR_OPTIM = OptimConfig(muon_lr=0.024, adam_lr=0.006, adam_beta2=0.999, adam_eps=1e-8, adam_weight_decay=0.2,
                                muon_ns="polar_express", schedule="constant", warmup_steps=1, warmup_from_zero=True)


@pytest.mark.parametrize("budget,steps,tokens", [(8_000_000, 489, 8_011_776), (20_000_000, 1221, 20_004_864),
                                                 (100_000_000, 6104, 100_007_936)])
def test_budgets_take_their_steps_of_8_x_2048(tmp_path, budget, steps, tokens):
    """They train while fewer than the budget's tokens are seen (x.numel() each batch), so 8M tokens
    are 489 batches of 8 x 2048, not floor(8e6 / 16,384) = 488: their leaderboard's 8,011,776 tokens."""
    data = RowBatches(np.zeros((16, 2048), np.uint16), np.arange(16), 8, LoaderOrder(16, 8, 42))
    trainer = Trainer(tiny_model(64, 2047), LanguageModelTask(torch.zeros(1, 2048, dtype=torch.long), None), data,
                      TrainConfig(budget=budget, batch_size=8), FIVE_DOLLAR_OPTIM, tmp_path, quiet=True)
    seen = their_steps = 0
    while seen < budget:  # their loop
        seen += 8 * 2048
        their_steps += 1
    assert trainer.total_steps == their_steps == steps and trainer.total_steps * trainer.units_per_step == tokens


class StoppingRows(RowBatches):
    """Asks the trainer to stop (as Ctrl-C does) when its `at`-th batch is drawn."""

    def __init__(self, *args, trainer_ref: list, at: int):
        super().__init__(*args)
        self.calls, self.trainer_ref, self.at = 0, trainer_ref, at

    def next_batch(self):
        self.calls += 1
        if self.calls == self.at:
            self.trainer_ref[0].stop_requested = True
        return super().next_batch()


def test_a_resume_in_the_second_epoch_is_exact(rows, tmp_path, one_thread):
    data = open_text_data(rows_cfg(rows, rows=200, val_rows=16), batch_size=4, seed=0, budget=0, log=lambda *_: None)
    task = LanguageModelTask(data.val, data.tokenizer, eval_batch_size=8)
    cfg = TrainConfig(budget=60 * 4 * 33, batch_size=4, log_every=1, eval_every=20 * 4 * 33, ckpt_every=25 * 4 * 33)

    def trainer(run, batches):
        return Trainer(tiny_model(), task, batches, cfg, FIVE_DOLLAR_OPTIM, run, quiet=True)

    def fresh(**kw):  # 180 training rows: 45 batches an epoch, so the run crosses into epoch 1
        cls = StoppingRows if kw else RowBatches
        return cls(data.train.rows, data.train.train, 4, LoaderOrder(len(data.train.train), 4, 42), **kw)

    trainer(tmp_path / "full", fresh()).fit()
    ref = [None]
    first = trainer(tmp_path / "cut", fresh(trainer_ref=ref, at=53))
    ref[0] = first
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert first.step == 53 and first.data.order.epoch == 1  # stopped after the step that drew batch 53
    trainer(tmp_path / "cut", fresh()).fit(resume_from=resolve_checkpoint(tmp_path / "cut"))

    def losses(run, split):
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
                if r["split"] == split]

    for split in ("train", "eval"):
        assert losses(tmp_path / "cut", split) == losses(tmp_path / "full", split)  # bit for bit
    assert len(losses(tmp_path / "full", "train")) == 60


# ------------------------------------------------------------------------------- their optimiser


def test_merged_muon_orthogonalises_the_stacked_matrix():
    torch.manual_seed(0)
    parts = [torch.nn.Parameter(torch.randn(r, 16)) for r in (16, 8, 8, 16)]  # q, k, v, o of width 16
    whole = torch.nn.Parameter(torch.cat([p.detach() for p in parts]))
    separate = [torch.nn.Parameter(p.detach().clone()) for p in parts]
    merged = Muon(parts, lr=0.1, ns="polar_express", merged=[parts])
    single, apart = Muon([whole], lr=0.1, ns="polar_express"), Muon(separate, lr=0.1, ns="polar_express")
    for _ in range(3):
        g = torch.randn_like(whole)
        whole.grad = g.clone()
        for p, q, piece in zip(parts, separate, g.split([16, 8, 8, 16])):
            p.grad, q.grad = piece.clone(), piece.clone()
        for opt in (merged, single, apart):
            opt.step()
    assert torch.allclose(torch.cat([p.detach() for p in parts]), whole.detach(), atol=1e-6)
    assert not torch.allclose(torch.cat([p.detach() for p in separate]), whole.detach(), atol=1e-3)
    with pytest.raises(ValueError, match="one width"):
        Muon(parts + [torch.nn.Parameter(torch.zeros(4, 8))], merged=[parts[:1] + [torch.nn.Parameter(torch.zeros(4, 8))]])


def test_polar_express_and_the_schedule_that_starts_at_zero():
    torch.manual_seed(0)
    for shape in ((64, 32), (32, 96)):
        s = torch.linalg.svdvals(orthogonalize(torch.randn(shape), method="polar_express"))
        assert 0.85 < s.min() and s.max() < 1.15, s
    # their constant schedule: LambdaLR with one warm-up step, lambda(step) = step / 1 below it, then 1
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: s / 1 if s < 1 else 1.0)
    theirs = []
    for _ in range(6):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [lr_multiplier(s, 489, FIVE_DOLLAR_OPTIM) for s in range(6)] == theirs == [0.0] + [1.0] * 5


def test_interleaved_rope_is_the_half_split_one_on_permuted_coordinates():
    """torchtune rotates pairs (2i, 2i + 1), shared.blocks pairs (i, i + D/2), with the same
    frequencies: attention scores agree once each head's coordinates are permuted."""
    t, d = 12, 16
    q, k = torch.randn(t, d, dtype=torch.float64), torch.randn(t, d, dtype=torch.float64)
    cos, sin = (x.double() for x in rope_1d(t, d))

    def interleaved(x):
        a, b = x[:, 0::2], x[:, 1::2]
        return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(1)

    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])
    theirs = interleaved(q) @ interleaved(k).T
    ours = apply_rope(q[:, perm][None, None], cos, sin)[0, 0] @ apply_rope(k[:, perm][None, None], cos, sin)[0, 0].T
    assert torch.allclose(theirs, ours, atol=1e-5)  # apply_rope rotates in fp32


# ------------------------------------------------------------------------------- the harness


def test_the_harness_compares_the_two_presets_on_their_data(rows, tmp_path):
    records, common = tmp_path / "records", ["--budget", "1024", "--runs", "2", "--records_dir", str(tmp_path / "records"),
                                             "--runs_dir", str(tmp_path / "runs"), *SHAPE, f"data.source={rows}",
                                             f"data.tokenizer={rows / 'tokenizer.json'}", "data.rows=0"]
    base = run_script("speedrun.py", "--preset", "5dollar-88m", *common, "--label", "theirs", cwd=tmp_path, env_extra=ENV)
    assert base.returncode == 0, base.stderr[-3000:]
    (theirs,) = records.glob("5dollar-88m-1024-theirs-*.json")
    ours = run_script("speedrun.py", "--preset", "blueberry-88m", "--data_from", "5dollar-88m", *common, "--compare",
                      str(theirs), cwd=tmp_path, env_extra=ENV)
    assert ours.returncode == 0, ours.stderr[-3000:]
    assert "loss: " in ours.stdout and "Welch" in ours.stdout
    (mine,) = records.glob("blueberry-88m-1024-on-5dollar-88m_*.json")
    for path in (theirs, mine):
        rec = load_record(path)
        assert not absolute_paths(rec) and str(tmp_path) not in path.read_text()
        assert rec["config"]["data"]["split"] == "train_test_split" and rec["data"]["val_rows"] == 800
        # named by content hash; relative to the checkout where pytest's folder lies in its workspace (a clone in /tmp)
        source = rec["config"]["data"]["source"]
        assert source.startswith("sha256:") or (ROOT / source).resolve() == rows.resolve()
        assert rec["data"]["sha256"]
    rec = load_record(mine)
    assert rec["data_from"] == "5dollar-88m" and rec["config"]["optim"]["muon_ns"] == "quintic"  # Blueberry's recipe
    assert rec["comparison"]["baseline"] == theirs.name and rec["data"]["sha256"] == load_record(theirs)["data"]["sha256"]

    board = (records / "LEADERBOARD.md").read_text()
    tables = board.split("## ")
    ranked = next(t for t in tables if "| 5dollar-88m | theirs |" in t)
    assert "| blueberry-88m |" in ranked and "train_test_split(0.1, seed 42)" in ranked and "cpu" in ranked
    reference = next(t for t in tables if t.startswith("Reference: 5-dollar-llm"))
    assert "| 8M | 4.8403 | 1m 26.178s | 8,011,776 |" in reference and "RTX 4090" in reference and "4ba324f" in reference
    assert "| 1 |" not in reference  # published records are never ranked with measured ones

    debug = json.loads(theirs.read_text())
    debug["config"]["data"]["seq_len"] = 64  # another data set: refused before any training
    (tmp_path / "other.json").write_text(json.dumps(debug))
    refused = run_script("speedrun.py", "--preset", "blueberry-88m", "--data_from", "5dollar-88m", *common, "--compare",
                         str(tmp_path / "other.json"), cwd=tmp_path, env_extra=ENV)
    assert_one_line_error(refused, "cannot compare", "data.seq_len")


def test_a_record_with_an_absolute_path_is_refused(tmp_path):
    record = {"schema": 1, "label": "x", "preset": "debug", "budget": 2048, "overrides": ["data.source=/home/me/text"],
              "runs": [{"seed": 0, "loss": 1.0, "train_time_s": 1.0, "run_dir": "speedrun/x/seed0"}]}
    assert "absolute path" in record_problem(record)
    record["overrides"] = ["data.source=../data/text"]  # relative: portable
    assert record_problem(record) == ""
    (tmp_path / "x.json").write_text(json.dumps(record))
    assert "| debug | x |" in leaderboard(tmp_path)


# ------------------------------------------------------------------------------- bad input


def test_bad_pretokenised_input_is_one_line_and_writes_nothing(rows, tmp_path):
    good = stored(rows)[:40].tolist()
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "not token ids"}) + "\n")
    (tmp_path / "short.jsonl").write_text("".join(json.dumps({"input_ids": r[:32] if i == 3 else r}) + "\n"
                                                  for i, r in enumerate(good)))
    (tmp_path / "past.jsonl").write_text("".join(json.dumps({"input_ids": [999] + r[1:] if i == 5 else r}) + "\n"
                                                 for i, r in enumerate(good)))
    tok = f"data.tokenizer={rows / 'tokenizer.json'}"
    cases = [
        ([f"data.source={tmp_path / 'text.jsonl'}", tok], ["has no 'input_ids'", "data.ids_field"]),
        ([f"data.source={tmp_path / 'short.jsonl'}", tok], ["row 3", "32 ids", "33"]),
        ([f"data.source={tmp_path / 'past.jsonl'}", tok], ["row 5", "999", "400 tokens"]),
        ([f"data.source={rows}", tok, "data.rows=1000"], ["100 validation rows", "data.val_rows = 800"]),
    ]
    cache = tmp_path / "cache"

    def train(numbered):
        i, (overrides, _) = numbered
        return run_script("train_llm.py", "--config", "5dollar-88m", "--experiment_name", f"case{i}", "--runs_dir",
                          str(tmp_path / "runs"), *SHAPE, *overrides, cwd=tmp_path,
                          env_extra={**ENV, "BLUEBERRY_CACHE": str(cache)})

    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = list(pool.map(train, enumerate(cases)))
    for (_, fragments), proc in zip(cases, procs):
        assert_one_line_error(proc, *fragments)
    assert not list((tmp_path / "runs").glob("*"))  # no run folder (the refused run's lock went with it)
    written = [p.name for p in (cache / "tokens").iterdir() if not p.name.endswith(".lock")] if (cache / "tokens").exists() else []
    assert written == []  # no row cache, no partial one
