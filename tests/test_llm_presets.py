"""Presets build the models their names promise; tokenizers load from every supported source."""

import pytest
import torch

from llm.config import LLMRunConfig, padded_vocab
from llm.model import Decoder
from llm.tokenizer import load_tokenizer
from shared.config import load_config
from shared.errors import ConfigError, UserError
from shared.trainer import count_params

from conftest import ROOT


@pytest.mark.parametrize("name,millions", [("blueberry-88m", 88), ("blueberry-151m", 151)])
def test_preset_parameter_count_matches_its_name(name, millions):
    cfg = load_config(LLMRunConfig, ROOT / "configs" / "llm" / f"{name}.toml", ["model.vocab_size=49152"])
    with torch.device("meta"):
        model = Decoder(cfg.model, cfg.data.seq_len)
    assert round(count_params(model) / 1e6) in (millions, millions + 1)
    assert cfg.data.seq_len == 2048 and cfg.model.d_model == 512


def test_config_rejects_unknown_keys_wrong_types_and_bad_combinations():
    path = ROOT / "configs" / "llm" / "debug.toml"
    with pytest.raises(ConfigError, match="unknown config key 'model.widht'"):
        load_config(LLMRunConfig, path, ["model.widht=3"])
    with pytest.raises(ConfigError, match="train.budget"):
        load_config(LLMRunConfig, path, ["train.budget=\"lots\""])
    with pytest.raises(ConfigError, match="n_kv_heads"):
        load_config(LLMRunConfig, path, ["model.n_kv_heads=3"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_config(LLMRunConfig, path, ["model.mlp=\"gelu\""])
    cfg = load_config(LLMRunConfig, path, ["optim.muon_lr=1", "data.source=some/folder"])
    assert cfg.optim.muon_lr == 1.0 and cfg.data.source == "some/folder"


def test_padded_vocab():
    assert padded_vocab(50257) == 50304 and padded_vocab(49152) == 49152


def test_gpt2_vocab_and_merges_folder(data_dir):
    folder = data_dir / "tokenizers" / "gpt2"
    if not folder.is_dir():
        pytest.skip("GPT-2 tokenizer files not present")
    tok = load_tokenizer(str(folder))
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_id == 50256 and tok.vocab_size == 50257
    assert tok.decode(tok.encode("naïve café")) == "naïve café"


def test_tokenizer_json_file_and_bad_specs(tmp_path):
    from llm.tokenizer import TextTokenizer, train_bpe

    tok = TextTokenizer(train_bpe(["a small corpus of words", "and more words"] * 20, 300), "bpe:300")
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert again.fingerprint == tok.fingerprint and again.encode("words") == tok.encode("words")
    assert load_tokenizer(str(tmp_path)).fingerprint == tok.fingerprint  # a folder with tokenizer.json
    with pytest.raises(UserError, match="bpe:<vocab size>"):
        load_tokenizer("bpe:lots")
    with pytest.raises(UserError, match="not a file, a folder or a Hub name"):
        load_tokenizer("./missing/tokenizer.json")


@pytest.mark.parametrize("name", ["blueberry-88m", "blueberry-151m"])
@pytest.mark.parametrize("budget", [8_000_000, 20_000_000, 100_000_000, 1_000_000_000])
def test_preset_schedules_suit_every_speedrun_budget(name, budget):
    from shared.optim import lr_multiplier, warmup_steps

    cfg = load_config(LLMRunConfig, ROOT / "configs" / "llm" / f"{name}.toml", [f"train.budget={budget}"])
    per_step = cfg.train.batch_size * cfg.train.grad_accum * cfg.data.seq_len
    steps = -(-budget // per_step)
    assert steps >= 200  # enough optimiser steps at 8M tokens to warm up, hold and cool down
    warm = warmup_steps(steps, cfg.optim)
    cooldown_start = steps - round(cfg.optim.cooldown_frac * steps)
    assert warm <= cooldown_start  # the ramps never overlap
    lrs = [lr_multiplier(s, steps, cfg.optim) for s in range(steps)]
    assert max(lrs) == 1.0 and all(abs(b - a) <= 1.0 / warm + 1e-9 for a, b in zip(lrs, lrs[1:]))
    # validation fills within about 10M tokens of stream: the 8M run reads little past its budget
    assert cfg.data.val_tokens / cfg.data.val_fraction <= 12_000_000


def test_cpu_16m_names_its_data_by_environment(monkeypatch):
    path = ROOT / "configs" / "llm" / "cpu-16m.toml"
    monkeypatch.setenv("BLUEBERRY_DATA_DIR", "/data/here")
    cfg = load_config(LLMRunConfig, path, ["model.vocab_size=50304"])
    assert cfg.data.source == "/data/here/text" and cfg.data.tokenizer == "/data/here/tokenizers/gpt2"
    with torch.device("meta"):
        model = Decoder(cfg.model, cfg.data.seq_len)
    # the recipe of benchmarks/results/llm_recipe.md: untied embedding and head, one value table
    assert round(count_params(model) / 1e6) == 35 and cfg.train.budget // (16 * 256) == 244
    assert not cfg.model.tie_embeddings and cfg.model.value_embeds == 1 and cfg.optim.muon_beta2 == 0.9
    monkeypatch.delenv("BLUEBERRY_DATA_DIR")
    with pytest.raises(ConfigError, match=r"data.source = '\$\{BLUEBERRY_DATA_DIR\}/text' needs the environment "
                                          "variable BLUEBERRY_DATA_DIR, which is not set"):
        load_config(LLMRunConfig, path)
    assert load_config(LLMRunConfig, path, ["data.source=a", "data.tokenizer=b"]).data.source == "a"
