"""Runs as other runs and loaders find them: a resume keeps what the run was trained with and
records what it changes, a dependent run holds the VQ-VAE it needs, a tokenizer that does not fit
the model is refused, a full disk or a deleted run folder stops in one line, a run of another kind
and a run name that is a path are named as such."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
from safetensors import SafetensorError

from conftest import LLM_DEBUG, ROOT, TINY_LLM, assert_one_line_error, run_script
from llm.config import LLMRunConfig
from llm.data import PackedBatches
from shared import checkpoint as ckpt_mod
from shared.checkpoint import resolve_checkpoint
from shared.config import dump_toml, load_config, load_toml
from shared.errors import ConfigError, UserError
from shared.run import add_common_args, resolve_run, save_config
from test_trainer import TOKENS, make

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process training, beside other jobs

ENV = {"OMP_NUM_THREADS": "1"}


def resolve(argv: list[str], cls=LLMRunConfig, package="llm", extra=None, **kw):
    """resolve_run as a training script calls it, on these command-line words."""
    p = argparse.ArgumentParser()
    add_common_args(p)
    return resolve_run(p.parse_intermixed_args(argv), cls, extra or {}, package=package, **kw)


def fake_run(path: Path, cfg) -> Path:
    """A run folder with a config and a (weightless) checkpoint at step 4: enough to resolve and load configs."""
    save_config(cfg, path)
    step = path / "checkpoints" / "step_000004"
    step.mkdir(parents=True)
    (step / "model.safetensors").write_bytes(b"")
    (path / "checkpoints" / "latest").write_text("step_000004\n")
    return path


def preset(package: str, cls_path: str, name: str = "debug", *overrides: str):
    module, cls = cls_path.rsplit(".", 1)
    return load_config(getattr(__import__(module, fromlist=[cls]), cls), ROOT / "configs" / package / f"{name}.toml",
                       list(overrides))


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory) -> Path:
    """A tiny LLM run trained by the script with a changed rope_theta (architecture) and muon_lr (recipe)."""
    cwd = tmp_path_factory.mktemp("llm")
    proc = run_script("train_llm.py", "--config", LLM_DEBUG, "--experiment_name", "base", *TINY_LLM, "train.budget=512",
                      "model.rope_theta=500000", "optim.muon_lr=0.05", cwd=cwd, env_extra=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return cwd / "runs" / "base"


def copy_run(run: Path, tmp_path: Path, name: str = "copy") -> Path:
    out = tmp_path / "runs" / name
    shutil.copytree(run, out)
    return out


# ------------------------------------------------------------------------------- resume


def test_resume_keeps_the_saved_config_and_records_a_change(llm_run, tmp_path, capsys):
    """Before: --config on resume replaced the run's settings with the preset's (rope_theta 10000,
    muon_lr 0.02) and config.toml was overwritten with them."""
    run = copy_run(llm_run, tmp_path)
    cfg, run_dir, resume = resolve(["--config", LLM_DEBUG, "--experiment_name", "copy", "--runs_dir", str(tmp_path / "runs"),
                                    "--resume", *TINY_LLM, "train.budget=1024"])
    assert cfg.model.rope_theta == 500000 and cfg.optim.muon_lr == 0.05 and cfg.train.budget == 1024
    assert "optim.muon_lr 0.05 -> 0.02" in capsys.readouterr().out  # the preset's value, not applied
    save_config(cfg, run_dir, resume)  # what the script's on_start does
    saved = load_config(LLMRunConfig, run / "config.toml")
    assert saved.model.rope_theta == 500000 and saved.optim.muon_lr == 0.05 and saved.train.budget == 1024
    changes = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    assert changes == [{"step": 4, "key": "train.budget", "before": 512, "after": 1024}]


def test_an_explicit_recipe_change_applies_and_is_recorded(llm_run, tmp_path):
    run = copy_run(llm_run, tmp_path)
    cfg, run_dir, resume = resolve(["--experiment_name", "copy", "--runs_dir", str(tmp_path / "runs"), "--resume",
                                    "optim.muon_lr=0.03", "train.budget=1024"])
    assert cfg.optim.muon_lr == 0.03 and cfg.model.rope_theta == 500000
    save_config(cfg, run_dir, resume)
    assert load_config(LLMRunConfig, run / "config.toml").optim.muon_lr == 0.03
    changes = {c["key"]: c for c in map(json.loads, (run / "config_changes.jsonl").read_text().splitlines())}
    assert changes["optim.muon_lr"] == {"step": 4, "key": "optim.muon_lr", "before": 0.05, "after": 0.03}


@pytest.mark.parametrize("override,fragments", [
    ("model.rope_theta=10000.0", ("model.rope_theta = 10000.0", "trained with 500000.0", "does not fit this model")),
    ("data.seq_len=64", ("data.seq_len = 64", "trained with 32", "keeps its sequence layout")),
    ('data.tokenizer="bpe:300"', ('data.tokenizer = "bpe:300"', 'trained with "bpe:400"')),
    ("train.batch_size=8", ("train.batch_size = 8", "trained with 4")),
])
def test_a_changed_architecture_or_data_key_is_refused(llm_run, tmp_path, override, fragments):
    """Before: accepted, and the run went on (or failed later) with a config.toml it was not trained with."""
    copy_run(llm_run, tmp_path)
    with pytest.raises(ConfigError) as e:
        resolve(["--experiment_name", "copy", "--runs_dir", str(tmp_path / "runs"), "--resume", override])
    assert "\n" not in str(e.value)
    for f in fragments:
        assert f in str(e.value), str(e.value)


def test_a_multimodal_resume_keeps_its_tokenizer_and_may_find_its_vqvae_elsewhere(tmp_path):
    from multimodal.config import MultimodalRunConfig

    vq = tmp_path / "vq"
    vq.mkdir()
    fake_run(tmp_path / "runs" / "mm", preset("multimodal", "multimodal.config.MultimodalRunConfig", "debug",
                                              f'data.vqvae="{vq}"'))
    base = ["--experiment_name", "mm", "--runs_dir", str(tmp_path / "runs"), "--resume"]
    with pytest.raises(ConfigError, match='data.tokenizer = "bpe:300" but .* was trained with "bpe:512"'):
        resolve([*base, 'data.tokenizer="bpe:300"'], MultimodalRunConfig, "multimodal")
    moved = tmp_path / "vq-moved"
    moved.mkdir()
    cfg, _, _ = resolve(base, MultimodalRunConfig, "multimodal", {"data.vqvae": str(moved)}, free=("data.vqvae",))
    assert cfg.data.vqvae == str(moved)  # where it is now; train_multimodal.py checks it is the same by fingerprint


OLD_MOE = dict(experts=0, top_k=2, hidden=0, shared_experts=0, dense_layers=0, capacity_factor=0.0, aux_weight=0.01,
               z_weight=0.001, bias_rate=0.0)  # the flat moe_* keys every LLM config.toml held, at their defaults


def flat_moe_run(path: Path, cfg) -> Path:
    """A run whose config.toml names the MoE settings as runs did before [model.moe]: moe_experts, ..."""
    fake_run(path, cfg)
    data = load_toml(path / "config.toml")
    moe = {**OLD_MOE, **data["model"].pop("moe", {})}
    data["model"].update({f"moe_{k}": v for k, v in moe.items()})
    (path / "config.toml").write_text(dump_toml(data))
    return path


@pytest.mark.parametrize("name", ["moe-debug", "debug"])
def test_an_old_runs_flat_moe_keys_load_and_resume_without_a_change(tmp_path, name):
    cfg = preset("llm", "llm.config.LLMRunConfig", name)
    run = flat_moe_run(tmp_path / "runs" / "old", cfg)
    assert "moe_experts" in (run / "config.toml").read_text()
    assert load_config(LLMRunConfig, run / "config.toml").model == cfg.model  # moe_experts = 0: dense, moe None
    base = ["--experiment_name", "old", "--runs_dir", str(tmp_path / "runs"), "--resume"]
    again, run_dir, resume = resolve([*base, "train.budget=2048"])
    assert again.model == cfg.model
    save_config(again, run_dir, resume)
    changes = [json.loads(line) for line in (run / "config_changes.jsonl").read_text().splitlines()]
    assert changes == [{"step": 4, "key": "train.budget", "before": cfg.train.budget, "after": 2048}]  # a rename is no change
    assert "moe_" not in (run / "config.toml").read_text()
    if name == "moe-debug":  # an architecture key under its old name is still refused
        with pytest.raises(ConfigError, match=r"model\.moe\.top_k = 1 but .* trained with 2"):
            resolve([*base, "model.moe_top_k=1"])


def test_old_moe_names_on_the_command_line_override_the_new_table():
    path = ROOT / "configs" / "llm" / "moe-debug.toml"
    cfg = load_config(LLMRunConfig, path, ["model.moe_bias_rate=0.01", "model.moe_top_k=1"])
    assert cfg.model.moe.bias_rate == 0.01 and cfg.model.moe.top_k == 1 and cfg.model.moe.experts == 8
    assert load_config(LLMRunConfig, path, ["model.moe.experts=0"]).model.moe is None
    assert load_config(LLMRunConfig, LLM_DEBUG, ["model.moe.experts=4"]).model.moe.top_k == 2


@pytest.mark.parametrize("name", ["", "../../x", "a/b", ".."])
def test_an_experiment_name_is_a_plain_name(tmp_path, name):
    """Before: "" fell back to the config's name, "../../x" wrote outside the runs folder."""
    with pytest.raises(UserError, match="--experiment_name") as e:
        resolve(["--config", LLM_DEBUG, "--experiment_name", name, "--runs_dir", str(tmp_path / "runs")])
    assert "\n" not in str(e.value)
    assert not (tmp_path / "x").exists() and not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------- writes


@pytest.mark.parametrize("target,error", [
    ("save_file", SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")),
    ("torch.save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")),
    ("save_file", OSError(28, "No space left on device")),
    ("_write_atomic", OSError(28, "No space left on device")),  # the `latest` file
], ids=["safetensors", "torch-zip", "oserror", "latest"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous(tmp_path, monkeypatch, target, error):
    """What a full disk raises (measured on a 64 KiB tmpfs): safetensors' SafetensorError and torch's
    zip-writer RuntimeError escaped as tracebacks before; only OSError was caught."""
    trainer = make(tmp_path / "run")
    trainer.train_step()
    good = trainer.save()

    def full(*a, **k):
        raise error

    monkeypatch.setattr(*((ckpt_mod.torch, "save") if target == "torch.save" else (ckpt_mod, target)), full)
    trainer.train_step()
    with pytest.raises(UserError, match="could not write a checkpoint at step 2.*previous checkpoint is kept") as e:
        trainer.save()
    assert "\n" not in str(e.value)
    ckpts = tmp_path / "run" / "checkpoints"
    assert resolve_checkpoint(ckpts) == good and sorted(p.name for p in ckpts.iterdir()) == ["latest", good.name]


def test_a_full_disk_writing_the_config_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = LLMRunConfig()
    save_config(cfg, tmp_path)
    before = (tmp_path / "config.toml").read_text()
    cfg.train.budget = 5

    def full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(UserError, match="could not write the run config .*No space left on device"):
        save_config(cfg, tmp_path)
    monkeypatch.undo()
    assert (tmp_path / "config.toml").read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["config.toml"]


class DeletingBatches(PackedBatches):
    """Deletes the run folder when its `at`-th batch is drawn, as a user cleaning up runs/ might."""

    def __init__(self, *args, run_dir: Path, at: int, **kw):
        super().__init__(*args, **kw)
        self.calls, self.run_dir, self.at = 0, run_dir, at

    def next_batch(self):
        self.calls += 1
        while self.calls == self.at and self.run_dir.exists():  # TensorBoard's writer thread may add a file meanwhile
            shutil.rmtree(self.run_dir, ignore_errors=True)
        return super().next_batch()


def test_a_run_folder_deleted_while_training_stops_at_the_next_logging_point(tmp_path):
    """Before: training went on and the next checkpoint recreated runs/<name>/checkpoints without config.toml."""
    run = tmp_path / "run"
    trainer = make(run, data=DeletingBatches(TOKENS, 32, 4, seed=0, run_dir=run, at=11))  # in step 6 of 12
    with pytest.raises(UserError, match=r"run folder .* was deleted while training: stopped at step 6") as e:
        trainer.fit()
    assert "\n" not in str(e.value) and not run.exists()


# ------------------------------------------------------------------------------- kinds


KINDS = {
    "llm": ("llm", "llm.config.LLMRunConfig"),
    "vqvae": ("vqvae", "vqvae.config.VQVAERunConfig"),
    "flow_matching": ("flow_matching", "flow_matching.config.FlowMatchingRunConfig"),
    "multimodal": ("multimodal", "multimodal.config.MultimodalRunConfig"),
    "classifier": ("classifier", "judge.config.ClassifierRunConfig"),
}
NAMES = {"llm": "text LLM", "vqvae": "VQ-VAE", "flow_matching": "flow-matching", "multimodal": "multimodal",
         "classifier": "classifier"}


def load_with(kind: str, path: Path):
    if kind == "llm":
        from llm.load import load_llm_run
        return load_llm_run(path)
    if kind == "vqvae":
        from vqvae.tokenizer import VQTokenizer
        return VQTokenizer.from_run(path)
    if kind == "flow_matching":
        from flow_matching.load import load_model
        return load_model(path)
    from multimodal.load import load_run
    return load_run(path)


@pytest.mark.parametrize("loader", ["llm", "vqvae", "flow_matching", "multimodal"])
def test_every_loader_names_a_run_of_another_kind(tmp_path, loader):
    """Before: "unknown config key 'model.d_model'" and the like (the LLM loader: its own wording)."""
    for other, (package, cls) in KINDS.items():
        if other == loader:
            continue
        run = fake_run(tmp_path / other, preset(package, cls))
        with pytest.raises(UserError) as e:
            load_with(loader, run)
        assert str(e.value) == f"{run} is not a {NAMES[loader]} run (it is a {NAMES[other]} run)"


def test_resuming_a_run_of_another_kind_is_refused(tmp_path):
    from vqvae.config import VQVAERunConfig

    fake_run(tmp_path / "runs" / "text", preset("llm", "llm.config.LLMRunConfig"))
    with pytest.raises(UserError, match="is not a VQ-VAE run \\(it is a text LLM run\\)"):
        resolve(["--experiment_name", "text", "--runs_dir", str(tmp_path / "runs"), "--resume"], VQVAERunConfig, "vqvae")


def test_a_multimodal_run_over_an_llm_run_is_one_line(tmp_path):
    """The issue's probe, as a user types it."""
    llm = fake_run(tmp_path / "runs" / "text", preset("llm", "llm.config.LLMRunConfig"))
    proc = run_script("train_multimodal.py", "--config", "debug", "--vqvae", str(llm), cwd=tmp_path, env_extra=ENV)
    assert_one_line_error(proc, f"{llm} is not a VQ-VAE run (it is a text LLM run)")


# ------------------------------------------------------------------------------- tokenizers


def swap_two_tokens(path: Path) -> None:
    """Another tokenizer of the same size: two tokens trade ids."""
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    path.write_text(json.dumps(data))


def test_a_tokenizer_that_does_not_fit_the_model_is_refused_at_every_load(llm_run, tmp_path):
    """Before: another run's tokenizer.json loaded and generated garbage (and scored), exit 0."""
    from llm.load import load_llm_run
    from llm.tokenizer import TextTokenizer, load_tokenizer, train_bpe

    run = copy_run(llm_run, tmp_path)
    other = TextTokenizer(train_bpe(["another corpus entirely"] * 20, 300), "bpe:300")
    other.save(run / "tokenizer.json")
    with pytest.raises(UserError, match="tokenizer.json has 2.. tokens but the model of .* has 448 embedding rows"):
        load_llm_run(run)

    shutil.copy(llm_run / "tokenizer.json", run / "tokenizer.json")
    swap_two_tokens(run / "tokenizer.json")
    with pytest.raises(UserError, match="is not the tokenizer .* was trained with"):
        load_llm_run(run)
    proc = run_script("generate_llm.py", "--checkpoint", str(run), "--max_new_tokens", "2", cwd=tmp_path, env_extra=ENV)
    assert_one_line_error(proc, "is not the tokenizer")
    from llm.load import check_resumed_tokenizer

    with pytest.raises(UserError, match="a resumed run keeps its tokenizer"):
        check_resumed_tokenizer(load_tokenizer(str(run / "tokenizer.json")), llm_run)

    assert load_llm_run(llm_run).tokenizer_check == "size and fingerprint"
    shutil.copy(llm_run / "tokenizer.json", run / "tokenizer.json")
    (run / "tokenizer_id.json").unlink()  # a run from before fingerprints were recorded: its size is checked
    assert load_llm_run(run).tokenizer_check.startswith("size only")


# ------------------------------------------------------------------------------- dependent runs


def vqvae_run(run_dir: Path, budget: int, resume: Path | None = None) -> None:
    """A tiny VQ-VAE run as train_vqvae.py leaves it, keeping one checkpoint (resuming prunes the older)."""
    from trainers import vqvae_trainer
    from vqvae.config import VQVAERunConfig

    overrides = ["train.batch_size=8", f"train.budget={budget}", "train.keep_checkpoints=1"]
    trainer = vqvae_trainer(run_dir, *overrides[1:])
    cfg = load_config(VQVAERunConfig, ROOT / "configs" / "vqvae" / "debug.toml", overrides)
    trainer.fit(resume, on_start=lambda: save_config(cfg, run_dir))


@pytest.mark.slow
def test_a_multimodal_run_keeps_the_vqvae_it_was_trained_on(tmp_path):
    """Before: resuming the VQ-VAE run moved its latest checkpoint on and pruned the one the
    multimodal run was trained on, which then failed to load ("not the one this run was trained on")."""
    from multimodal.load import load_run
    from multimodal.vocab import Vocabulary

    vq = tmp_path / "runs" / "vq"
    vqvae_run(vq, 64)
    proc = run_script("train_multimodal.py", "--config", "debug", "--vqvae", str(vq), "--experiment_name", "mm",
                      "train.budget=64", "train.batch_size=8", "train.eval_every=0", "data.eval_images=4",
                      "data.zero_shot_images=0", "sample.per_class=1", "sample.captions=0", cwd=tmp_path, env_extra=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    mm = tmp_path / "runs" / "mm"
    trained_on = Vocabulary.load(mm).vq_fingerprint

    vqvae_run(vq, 128, resume=resolve_checkpoint(vq))  # the VQ-VAE trains on; its step-8 checkpoint is pruned
    assert [p.name for p in (vq / "checkpoints").glob("step_*")] == ["step_000016"]
    assert load_run(mm).vq.fingerprint == trained_on
    shutil.rmtree(vq)  # even without the VQ-VAE run at all
    assert load_run(mm).vq.fingerprint == trained_on
