"""Hugging Face export: transformers loads the folder and computes the project's logits."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_one_line_error, run_script
from llm.config import LLMRunConfig
from llm.model import Decoder, DecoderConfig
from llm.tokenizer import TextTokenizer, train_bpe
from shared.checkpoint import save_checkpoint
from shared.run import save_config

transformers = pytest.importorskip("transformers")  # a test extra: pip install -e ".[dev]"


def fake_run(path, **model_kw) -> tuple[Decoder, TextTokenizer]:
    """A run folder as train_llm.py leaves it, with random (not zero-initialised) weights."""
    tok = TextTokenizer(train_bpe(["a small corpus of words, and more words for the merges"] * 20, 300), "bpe:300")
    cfg = LLMRunConfig()
    cfg.model = DecoderConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp="swiglu", mlp_hidden=96,
                              vocab_size=320, zero_init_out=False, **model_kw)
    cfg.data.seq_len = 64
    torch.manual_seed(0)
    model = Decoder(cfg.model, cfg.data.seq_len)
    with torch.no_grad():  # norms away from 1, so a misplaced norm weight would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    save_config(cfg, path)
    tok.save(path / "tokenizer.json")
    save_checkpoint(path / "checkpoints", 1, model, {"step": 1})
    return model.eval(), tok


@pytest.mark.parametrize("qk_norm,arch", [(True, "Qwen3ForCausalLM"), (False, "LlamaForCausalLM")])
def test_exported_model_gives_the_same_logits(tmp_path, qk_norm, arch):
    model, tok = fake_run(tmp_path / "run", qk_norm=qk_norm)
    proc = run_script("export_llm.py", str(tmp_path / "run"), "--out", str(tmp_path / "hf"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert arch in proc.stdout
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf).__name__ == arch
    ids = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
    assert theirs.shape == ours.shape and torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok("more words", add_special_tokens=False)["input_ids"] == tok.encode("more words")
    assert hf_tok.eos_token == tok.eos_token


def test_export_refuses_squared_relu_and_a_used_folder(tmp_path):
    proc = run_script("train_llm.py", "--config", "debug", "--experiment_name", "tiny", "data.builtin_docs=300",
                      "data.tokenizer=\"bpe:400\"", "data.seq_len=32", "train.batch_size=4", "train.budget=256",
                      "train.eval_every=0", "sample.max_new_tokens=2", cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    refused = run_script("export_llm.py", str(tmp_path / "runs" / "tiny"), "--out", str(tmp_path / "hf"), cwd=tmp_path)
    assert_one_line_error(refused, "squared-ReLU MLP has no standard Hugging Face architecture")
    assert not (tmp_path / "hf").exists()
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    used = run_script("export_llm.py", str(tmp_path / "runs" / "tiny"), "--out", str(tmp_path / "used"), cwd=tmp_path)
    assert_one_line_error(used, "not empty")
