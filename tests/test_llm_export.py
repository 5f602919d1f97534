"""Hugging Face export: transformers loads the folder and computes the project's logits, for every
dense architecture (Qwen3, Llama, and the custom Blueberry code for squared ReLU and the options).
`pytest -s` prints the largest logit difference per shape (benchmarks/results/llm_export.md)."""

from __future__ import annotations

import ast
import http.server
import json
import shutil
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from safetensors.torch import save_file

from conftest import ROOT, assert_one_line_error, run_script
from llm.config import LLMRunConfig
from llm.export import CODE_FILES, HF_CODE, check_repo_id, export_run, hf_config, hf_state_dict, push_to_hub
from llm.load import load_llm_run, save_run_tokenizer
from llm.model import Decoder, DecoderConfig
from llm.tokenizer import TextTokenizer, train_bpe
from shared.checkpoint import save_checkpoint
from shared.config import from_dict, load_toml
from shared.errors import UserError
from shared.moe import MoEConfig
from shared.run import save_config

transformers = pytest.importorskip("transformers")  # a test extra: pip install -e ".[dev]"

# small versions of each preset's shape, and what transformers should load them as
SHAPES = {
    "debug (relu2, QK-norm, tied)": ("BlueberryForCausalLM", dict(mlp="relu2")),
    "swiglu, QK-norm, tied": ("Qwen3ForCausalLM", dict(mlp="swiglu")),
    "blueberry-151m (swiglu, QK-norm, tied, the recipe's forward options)": ("BlueberryForCausalLM", dict(
        mlp="swiglu", embed_norm=True, smear=True, residual_scalars=True, logit_softcap=15.0, qk_scale=1.2,
        rope_theta=100_000.0)),
    "swiglu, no QK-norm, untied, depth_init": ("LlamaForCausalLM",
                                               dict(mlp="swiglu", qk_norm=False, tie_embeddings=False, depth_init=True)),
    "options (relu2, untied, every forward option)": ("BlueberryForCausalLM", dict(
        mlp="relu2", qk_norm=False, tie_embeddings=False, embed_scale=True, logit_softcap=15.0, sandwich_norm=True,
        gated_attn=True, residual_scalars=True, value_embeds=1, mlp_hidden_last=192)),
    "options (swiglu, QK-norm, tied)": ("BlueberryForCausalLM", dict(
        mlp="swiglu", gated_attn=True, value_embeds=2, residual_scalars=True, mlp_hidden_last=256)),
    "nanochat's options (relu2, QK-norm, untied)": ("BlueberryForCausalLM", dict(
        mlp="relu2", tie_embeddings=False, embed_norm=True, smear=True, value_embeds=1, value_gate=True,
        residual_scalars=True, logit_softcap=15.0, qk_scale=1.2, rope_theta=100_000.0, n_layers=3)),
}


def fake_run(path, summary: dict | None = None, **model_kw) -> tuple[Decoder, TextTokenizer]:
    """A run folder as train_llm.py leaves it, with random (not zero-initialised) weights."""
    tok = TextTokenizer(train_bpe(["a small corpus of words, and more words for the merges"] * 20, 300), "bpe:300")
    cfg = LLMRunConfig()
    cfg.model = DecoderConfig(**{**dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, mlp_hidden=96,
                                        vocab_size=320, zero_init_out=False), **model_kw})
    cfg.data.seq_len = 64
    torch.manual_seed(0)
    model = Decoder(cfg.model, cfg.data.seq_len)
    with torch.no_grad():  # norms, gains and gates away from their initial values, so a misplaced one would show
        for name, p in model.named_parameters():
            if "norm" in name or "scale" in name or name.endswith("bias") or name == "smear_lambda":
                p.uniform_(0.5, 1.5)
    path.mkdir(parents=True)
    save_config(cfg, path)
    save_run_tokenizer(tok, path)
    save_checkpoint(path / "checkpoints", 1, model, {"step": 1})
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return model.eval(), tok


def load_export(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()


@pytest.mark.parametrize("shape", SHAPES)
def test_exported_model_gives_the_same_logits(tmp_path, shape):
    arch, model_kw = SHAPES[shape]
    model, tok = fake_run(tmp_path / "run", **model_kw)
    export = export_run(load_llm_run(tmp_path / "run"), tmp_path / "hf", command="python scripts/export_llm.py ...")
    assert export.architecture == arch
    custom = arch == "BlueberryForCausalLM"
    assert all((tmp_path / "hf" / f).is_file() for f in CODE_FILES) == custom
    hf = load_export(tmp_path / "hf")
    assert type(hf).__name__ == arch
    if custom:  # a tied head is the embedding itself: no second matrix to load or to drift
        assert hasattr(hf, "lm_head") != model.cfg.tie_embeddings
    assert sum(p.numel() for p in hf.parameters()) == sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())

    ids = torch.randint(0, tok.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(ids), hf(ids).logits
        diff = (ours - theirs).abs().max().item()
        # a left-padded batch: each row's real positions give that row's logits alone
        short = ids[1, :25]
        padded = torch.stack([ids[0], torch.cat([torch.full((15,), tok.eos_id), short])])
        mask = torch.stack([torch.ones(40, dtype=torch.long), torch.cat([torch.zeros(15), torch.ones(25)]).long()])
        both = hf(padded, attention_mask=mask).logits
        pad_diff = max((both[0] - ours[0]).abs().max().item(), (both[1, 15:] - model(short[None])[0]).abs().max().item())
    print(f"\n{shape}: {arch}, max |logit difference| {diff:.2e} (left-padded batch {pad_diff:.2e})")
    assert theirs.shape == ours.shape and diff < 1e-4
    assert pad_diff < 1e-4 and torch.isfinite(both).all()

    # greedy generate() follows the project's greedy decoding (the padded vocabulary rows suppressed)
    prompt = torch.tensor([[tok.eos_id, *tok.encode("more words")]])
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                      eos_token_id=None, pad_token_id=tok.eos_id)
    want = prompt
    with torch.no_grad():
        for _ in range(6):
            logits = model(want)[:, -1]
            logits[:, tok.vocab_size:] = float("-inf")
            want = torch.cat([want, logits.argmax(-1, keepdim=True)], 1)
    assert out.tolist() == want.tolist()
    if arch == "BlueberryForCausalLM":  # its KV cache: after the prompt, generate() feeds one token a step
        fed = []
        hook = hf.model.register_forward_pre_hook(lambda module, args: fed.append(args[0].shape[1]))
        hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False,
                    eos_token_id=None, pad_token_id=tok.eos_id)
        hook.remove()
        assert fed == [prompt.shape[1]] + [1] * 5
        with torch.no_grad():  # a cached forward in two pieces gives the whole forward's logits, padded rows too
            cache = transformers.DynamicCache()
            first = hf(padded[:, :30], attention_mask=mask[:, :30], past_key_values=cache, use_cache=True).logits
            rest = hf(padded[:, 30:], attention_mask=mask, past_key_values=cache, prev_ids=padded[:, 29:30]).logits
        assert (torch.cat([first, rest], 1) - both).abs().max().item() < 1e-5

    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", trust_remote_code=True)  # 5.x reads config.json
    assert hf_tok("more words", add_special_tokens=False)["input_ids"] == tok.encode("more words")
    assert hf_tok("more words")["input_ids"] == [tok.eos_id, *tok.encode("more words")]  # a document's start
    assert hf_tok.eos_token == tok.eos_token and hf_tok.pad_token_id == tok.eos_id

    # a left-padded batch of prompts generates what each prompt generates alone
    hf_tok.padding_side = "left"
    texts = ["more words", "a small corpus of words, and"]
    batch = hf_tok(texts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0, 0] == 0
    together = hf.generate(**batch, max_new_tokens=4, do_sample=False, eos_token_id=None)[:, -4:]
    for row, text in zip(together, texts):
        alone = hf_tok(text, return_tensors="pt")
        assert row.tolist() == hf.generate(**alone, max_new_tokens=4, do_sample=False, eos_token_id=None)[0, -4:].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["debug", "blueberry-88m", "blueberry-151m"])
def test_full_size_presets_give_the_same_logits(tmp_path, preset):
    """Each dense preset at its real size and vocabulary (random weights, the export's own functions)."""
    cfg = from_dict(LLMRunConfig, load_toml(ROOT / "configs" / "llm" / f"{preset}.toml"))
    cfg.model.vocab_size = 896 if preset == "debug" else 49_152  # its BPE's, SmolLM2's
    cfg.model.zero_init_out = False
    torch.manual_seed(0)
    model = Decoder(cfg.model, cfg.data.seq_len).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    eos = SimpleNamespace(eos_id=0)
    save_file(hf_state_dict(model), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(hf_config(model, eos)))
    for file in CODE_FILES:
        shutil.copyfile(HF_CODE / file, tmp_path / file)
    hf = load_export(tmp_path)
    ids = torch.randint(0, cfg.model.vocab_size, (2, 128), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    print(f"\n{preset}: {type(hf).__name__}, {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M parameters, "
          f"max |logit difference| {diff:.2e}")
    assert type(hf).__name__ == "BlueberryForCausalLM"  # squared ReLU (debug, 88m), the recipe's options (151m)
    assert diff < 1e-4


def test_the_modelling_files_stand_alone():
    """They run inside an export or a Hub repository: torch and transformers only, never the project."""
    for file in CODE_FILES:
        tree = ast.parse((HF_CODE / file).read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
        assert roots <= {"torch", "transformers"}, (file, roots)


def test_model_card_holds_the_run_summary(tmp_path):
    summary = {"steps": 10, "unit": "tokens", "tokens": 81_920, "params": 1, "final_eval":
               {"loss": 3.21, "accuracy": 0.4567, "perplexity": 24.78}}
    fake_run(tmp_path / "run", summary=summary, mlp="relu2")
    export_run(load_llm_run(tmp_path / "run"), tmp_path / "hf", command="python scripts/export_llm.py runs/x --out hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    for fragment in ("BlueberryForCausalLM", "trust_remote_code=True", "81,920", "3.2100 / 0.4567 / 24.78",
                     "squared ReLU 96", "python scripts/export_llm.py runs/x --out hf", "lm_eval --model hf"):
        assert fragment in card, fragment
    assert (tmp_path / "hf" / "training_config.toml").is_file()


def test_export_refuses_moe_and_a_used_folder(tmp_path):
    fake_run(tmp_path / "moe", moe=MoEConfig(experts=4, hidden=32))
    with pytest.raises(UserError, match="mixture of experts"):
        export_run(load_llm_run(tmp_path / "moe"), tmp_path / "hf")
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf.*"))  # nothing left behind
    fake_run(tmp_path / "run")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "x").write_text("")
    with pytest.raises(UserError, match="not empty"):
        export_run(load_llm_run(tmp_path / "run"), tmp_path / "used")


def test_push_to_hub_fails_fast_in_one_line_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1") as offline:
        push_to_hub(tmp_path, "someone/blueberry-test")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(UserError, match="cannot reach the Hugging Face Hub at 127.0.0.1") as unreachable:
        push_to_hub(tmp_path, "someone/blueberry-test")
    assert time.perf_counter() - t0 < 10
    assert all("\n" not in str(e.value) for e in (offline, unreachable))
    for bad in ("a/b/c", "-x", "x y", "owner/", "a/b.git"):
        with pytest.raises(UserError, match="not a Hub model repository name"):
            check_repo_id(bad)


class RefusingHub(http.server.BaseHTTPRequestHandler):
    """A Hub that answers every request 401, as the real one answers a missing or read-only token."""

    def refuse(self):
        body = b'{"error": "Invalid credentials in Authorization header"}'
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = refuse

    def log_message(self, *args):
        pass


def test_push_to_hub_refused_is_one_line_naming_the_login(tmp_path, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RefusingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(UserError, match="401.*hf auth login") as refused:
            push_to_hub(tmp_path, "someone/blueberry-test", token="hf_not_a_token")
        assert "\n" not in str(refused.value)
    finally:
        server.shutdown()


@pytest.mark.slow
def test_export_script_on_a_trained_debug_run(tmp_path):
    """The debug preset (squared ReLU), trained for a few steps: exported by the script, loaded with
    trust_remote_code, the same logits; --push_to_hub offline exports, then fails in one line."""
    proc = run_script("train_llm.py", "--config", "debug", "--experiment_name", "tiny", "data.builtin_docs=300",
                      "data.tokenizer=\"bpe:400\"", "data.seq_len=32", "train.batch_size=4", "train.budget=256",
                      "train.eval_every=0", "sample.max_new_tokens=2", cwd=tmp_path, env_extra={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = run_script("export_llm.py", str(tmp_path / "runs" / "tiny"), "--out", str(tmp_path / "hf"),
                      "--push_to_hub", "someone/tiny", cwd=tmp_path, env_extra={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(proc, "HF_HUB_OFFLINE=1", "someone/tiny")
    assert "BlueberryForCausalLM" in proc.stdout
    run = load_llm_run(tmp_path / "runs" / "tiny")
    hf = load_export(tmp_path / "hf")
    ids = torch.randint(0, run.tokenizer.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(run.model(ids), hf(ids).logits, atol=1e-4)
    assert "training tokens" in (tmp_path / "hf" / "README.md").read_text()  # the run's summary.json
    used = run_script("export_llm.py", str(tmp_path / "runs" / "tiny"), "--out", str(tmp_path / "hf"), cwd=tmp_path)
    assert_one_line_error(used, "not empty")
