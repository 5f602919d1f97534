"""Blueberry as a Hugging Face `transformers` model, and its push to the Hub.

Three layouts, chosen from the run's architecture:

  Qwen3ForCausalLM      SwiGLU + QK-norm (per-head RMSNorm on queries and keys before RoPE)
  LlamaForCausalLM      SwiGLU without QK-norm
  BlueberryForCausalLM  everything else dense: squared ReLU (blueberry-88m, debug) and the
                        architecture options that change the forward pass; custom code
                        (llm/hf/*.py, copied into the export) that AutoModelForCausalLM loads
                        with trust_remote_code=True

Qwen3 and Llama rotate the two halves of each head (i, i + D/2), as shared.blocks does, with the
same inverse frequencies, so the weights move over unchanged. Options that only initialise or
train (depth_init, zero_init_out, init_std, merged_qkvo) leave the trained weights in a standard
layout. Mixtures of experts are refused. An export holds config.json, generation_config.json, model.safetensors (fp32),
tokenizer.json (which puts end-of-text before a text, where training documents start),
tokenizer_config.json, the run's resolved config as training_config.toml and a model card, README.md.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, processors

from shared.blocks import Attention
from shared.checkpoint import resolve_checkpoint
from shared.errors import UserError
from shared.hub import hub_endpoint, hub_failure, require_hub
from shared.run import check_output, find_run_dir

from .load import LLMRun
from .model import Decoder
from .tokenizer import TextTokenizer

HF_CODE = Path(__file__).parent / "hf"
CODE_FILES = ("configuration_blueberry.py", "modeling_blueberry.py")
# options that change the forward pass; the others (depth_init, zero_init_out, init_std, init, residual_init,
# merged_qkvo) only initialise or train
FORWARD_OPTIONS = ("gated_attn", "sandwich_norm", "embed_scale", "embed_norm", "smear", "value_embeds", "value_gate",
                   "residual_scalars", "logit_softcap")


def check_exportable(model: Decoder) -> None:
    if model.cfg.moe is not None:
        raise UserError("this run is a mixture of experts: export maps dense models only; a Qwen3-MoE mapping is "
                        "not written yet")


def custom_features(model: Decoder) -> list[str]:
    """Why a run needs the Blueberry architecture: what Qwen3/Llama cannot express (empty: it is standard)."""
    c = model.cfg
    why = ["squared-ReLU MLP"] if c.mlp != "swiglu" else []
    if len({model.mlp_width(i) for i in range(c.n_layers)}) > 1:
        why.append("model.mlp_hidden_last")
    if c.qk_scale != 1.0:
        why.append("model.qk_scale")
    return why + [f"model.{name}" for name in FORWARD_OPTIONS if getattr(c, name)]


def architecture(model: Decoder) -> str:
    check_exportable(model)
    if custom_features(model):
        return "BlueberryForCausalLM"
    return "Qwen3ForCausalLM" if model.cfg.qk_norm else "LlamaForCausalLM"


def hf_config(model: Decoder, tok: TextTokenizer) -> dict:
    c, arch = model.cfg, architecture(model)
    common = {"architectures": [arch], "vocab_size": c.vocab_size, "hidden_size": c.d_model,
              "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
              "head_dim": c.d_model // c.n_heads, "max_position_embeddings": model.max_seq_len,
              "rms_norm_eps": model.norm.eps, "rope_theta": c.rope_theta,
              "bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "torch_dtype": "float32"}
    if arch == "BlueberryForCausalLM":
        return {**common, "model_type": "blueberry",
                "auto_map": {"AutoConfig": "configuration_blueberry.BlueberryConfig",
                             "AutoModelForCausalLM": "modeling_blueberry.BlueberryForCausalLM"},
                "mlp": c.mlp, "intermediate_size": c.mlp_hidden,
                "intermediate_sizes": [model.mlp_width(i) for i in range(c.n_layers)], "qk_norm": c.qk_norm,
                "tie_embeddings": c.tie_embeddings, "tie_word_embeddings": False, "embed_scale": c.embed_scale,
                "logit_softcap": c.logit_softcap, "sandwich_norm": c.sandwich_norm, "gated_attn": c.gated_attn,
                "residual_scalars": c.residual_scalars, "value_embeds": c.value_embeds, "embed_norm": c.embed_norm,
                "smear": c.smear, "smear_channels": Decoder.SMEAR_CHANNELS, "value_gate": c.value_gate,
                "value_gate_channels": Attention.VALUE_GATE_CHANNELS, "qk_scale": c.qk_scale}
    config = {**common, "model_type": arch.removesuffix("ForCausalLM").lower(), "intermediate_size": c.mlp_hidden,
              "hidden_act": "silu", "tie_word_embeddings": c.tie_embeddings, "attention_bias": False,
              "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta}}  # 5.x; 4.x reads rope_theta
    if arch == "LlamaForCausalLM":
        config["mlp_bias"] = False
    return config


def hf_state_dict(model: Decoder) -> dict[str, torch.Tensor]:
    """Our parameter names mapped to the export's; a tied output layer is stored once (as the embedding)."""
    if architecture(model) == "BlueberryForCausalLM":  # the custom code keeps the project's names under model.
        out = {("" if k == "lm_head.weight" else "model.") + k: v for k, v in model.state_dict().items()
               if not (k == "lm_head.weight" and model.cfg.tie_embeddings)}
        return {k: v.detach().float().contiguous().clone() for k, v in out.items()}
    out = {"model.embed_tokens.weight": model.tok_emb.weight, "model.norm.weight": model.norm.weight}
    if not model.cfg.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, b in enumerate(model.blocks):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": b.norm1.weight, p + "post_attention_layernorm.weight": b.norm2.weight,
                p + "mlp.gate_proj.weight": b.mlp.gate.weight, p + "mlp.up_proj.weight": b.mlp.up.weight,
                p + "mlp.down_proj.weight": b.mlp.down.weight}
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "o_proj")):
            out[p + f"self_attn.{theirs}.weight"] = getattr(b.attn, ours).weight
        if model.cfg.qk_norm:
            out[p + "self_attn.q_norm.weight"] = b.attn.q_norm.weight
            out[p + "self_attn.k_norm.weight"] = b.attn.k_norm.weight
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def tokenizer_config(model: Decoder, tok: TextTokenizer) -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": tok.eos_token, "bos_token": tok.eos_token,
            "pad_token": tok.eos_token, "add_bos_token": True, "model_max_length": model.max_seq_len,
            "clean_up_tokenization_spaces": False,
            "model_input_names": ["input_ids", "attention_mask"]}  # no token_type_ids, which generate() would refuse


def hf_tokenizer(tok: TextTokenizer) -> Tokenizer:
    """The run's tokenizer with end-of-text put before every text (add_special_tokens, the default in
    transformers): training documents start after it, and lm-evaluation-harness then scores contexts as
    llm/downstream.py does."""
    out = Tokenizer.from_str(tok.tok.to_str())
    e = tok.eos_token
    template = processors.TemplateProcessing(single=f"{e}:0 $A:0", pair=f"{e}:0 $A:0 $B:1",
                                             special_tokens=[(e, tok.eos_id)])
    # a byte-level post-processor only trims offsets: kept; any other template was never used in
    # training (the project encodes without special tokens) and is replaced
    old = out.post_processor
    out.post_processor = processors.Sequence([old, template]) if isinstance(old, processors.ByteLevel) else template
    return out


def generation_config(model: Decoder, tok: TextTokenizer) -> dict:
    config = {"bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.eos_id}
    if model.cfg.vocab_size > tok.vocab_size:  # the embedding rows padded past the tokenizer are never sampled
        config["suppress_tokens"] = list(range(tok.vocab_size, model.cfg.vocab_size))
    return config


# The model card

# lm-evaluation-harness's model_args that score as llm/downstream.py does: add_bos_token puts
# end-of-text before each context (0.4.8, for one, encodes contexts without special tokens
# otherwise); logits_cache=False because 0.4.13's reuse of one-token continuations gathers a
# request's log-probability at the first position of another's continuation when one request's
# context plus choice extends another's context (measured: benchmarks/results/llm_export.md)
LM_EVAL_ARGS = ",add_bos_token=True,logits_cache=False"

def _millions(n: float) -> str:
    return f"{n / 1e6:.1f}M"


def read_summary(run_dir: Path) -> dict | None:
    path = run_dir / "summary.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError) as e:
        raise UserError(f"{path} is unreadable ({type(e).__name__}: {e})") from None


def model_card(run: LLMRun, arch: str, name: str, command: str | None = None) -> str:
    """README.md for the export (and its Hub repository): architecture, size, data, the run's
    summary, how to load, generate and evaluate it."""
    c, model = run.cfg.model, run.model
    run_dir = find_run_dir(run.ckpt)
    summary = read_summary(run_dir)
    params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    mlp = "squared ReLU" if c.mlp == "relu2" else "SwiGLU"
    widths = sorted({model.mlp_width(i) for i in range(c.n_layers)})
    custom = arch == "BlueberryForCausalLM"
    remote = ", trust_remote_code=True" if custom else ""
    model_args = f"pretrained={name}" + (",trust_remote_code=True" if custom else "") + LM_EVAL_ARGS
    rows = [("architecture", f"`{arch}`" + (" (custom code in this repository: load with `trust_remote_code=True`)"
                                            if custom else " (standard `transformers` code)")),
            ("parameters", f"{_millions(params)} ({params:,}, embeddings included"
                           f"{', tied to the output layer' if c.tie_embeddings else ''})"),
            ("layers, width, heads (query/key-value)", f"{c.n_layers}, {c.d_model}, {c.n_heads}/{c.n_kv_heads}"),
            ("MLP", f"{mlp} {widths[0]}" if len(widths) == 1 else f"{mlp} {widths[0]} to {widths[-1]} (wider with depth)"),
            ("attention", "RoPE (theta {:g}){}".format(c.rope_theta, ", QK-norm" if c.qk_norm else "")),
            ("context", f"{model.max_seq_len:,} tokens"),
            ("vocabulary", f"{run.tokenizer.vocab_size:,} tokens ({run.cfg.data.tokenizer}), {c.vocab_size:,} embedding rows"),
            ("training data", f"`{run.cfg.data.source}`")]
    options = custom_features(model)
    if options:
        rows.append(("beyond Qwen3/Llama", ", ".join(options)))
    if summary:
        ev = summary.get("final_eval") or {}
        tokens = summary.get(summary.get("unit", "tokens"))
        if tokens is not None:
            rows.append(("training tokens", f"{tokens:,}"))
        when = "end of run" if resolve_checkpoint(run_dir) == run.ckpt else "end of run, not this checkpoint"
        if "loss" in ev:
            rows.append((f"validation loss / accuracy / perplexity ({when})",
                         f"{ev['loss']:.4f} / {ev.get('accuracy', float('nan')):.4f} / {ev.get('perplexity', float('nan')):.2f}"))
    else:
        rows.append(("training summary", "none (summary.json is written when a run ends; this run had not ended)"))
    rows.append(("weights", f"{'EMA' if run.ema else 'trained'} weights of checkpoint `{run.ckpt.name}`"))
    table = "\n".join(["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows)])
    made = f"\n\nExported with:\n\n```bash\n{command}\n```" if command else ""
    return f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [blueberry, causal-lm]
---

# {name}

A small decoder-only language model trained from scratch with Blueberry.

{table}

The tokenizer puts end-of-text before each text (training documents start after it), and the model
ends a document with it.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tok = AutoTokenizer.from_pretrained("{name}"{remote})
model = AutoModelForCausalLM.from_pretrained("{name}"{remote})
ids = tok("Once upon a time", return_tensors="pt")
out = model.generate(**ids, max_new_tokens=48, do_sample=True, top_k=50)
print(tok.decode(out[0], skip_special_tokens=True))
```
Zero-shot evaluation with lm-evaluation-harness (`add_bos_token=True`: contexts start after
end-of-text, as training documents do; `logits_cache=False`: lm-eval 0.4.13's reuse of one-token
continuations can score a choice at the wrong position):

```bash
lm_eval --model hf --model_args {model_args} --tasks hellaswag,arc_easy,arc_challenge,piqa --batch_size 16
```

Training configuration: `training_config.toml` (the run's resolved config; `python scripts/train_llm.py
--config training_config.toml` in the Blueberry repository trains the same model).{made}
"""


# Writing the export

@dataclass
class Export:
    folder: Path
    architecture: str


def check_export_folder(out: str | Path) -> Path:
    """Refuse, before any work, a folder that exists and holds something."""
    path = check_output(out, folder=True)
    if path.is_dir() and any(path.iterdir()):
        raise UserError(f"{path} is not empty: choose a new folder for the export")
    return path


def export_run(run: LLMRun, out: str | Path, command: str | None = None, name: str | None = None) -> Export:
    """Write `run` as a transformers folder at `out` (new or empty). The files
    are written into a temporary sibling and moved into place at the end: a failed export leaves nothing."""
    out = check_export_folder(out)
    arch = architecture(run.model)
    tensors = hf_state_dict(run.model)
    files = {"config.json": json.dumps(hf_config(run.model, run.tokenizer), indent=2) + "\n",
             "generation_config.json": json.dumps(generation_config(run.model, run.tokenizer), indent=2) + "\n",
             "tokenizer_config.json": json.dumps(tokenizer_config(run.model, run.tokenizer), indent=2) + "\n",
             "README.md": model_card(run, arch, name or out.name, command)}
    config_toml = find_run_dir(run.ckpt) / "config.toml"
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.partial"  # mkdir, not mkdtemp: the user's umask, not 0700
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        for file, text in files.items():
            (tmp / file).write_text(text)
        hf_tokenizer(run.tokenizer).save(str(tmp / "tokenizer.json"))
        if config_toml.is_file():
            shutil.copyfile(config_toml, tmp / "training_config.toml")
        if arch == "BlueberryForCausalLM":
            for file in CODE_FILES:
                shutil.copyfile(HF_CODE / file, tmp / file)
        if out.is_dir():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise UserError(f"could not write the export to {out}: {e.strerror or e}") from None
        raise
    return Export(out, arch)


# The Hub

REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def check_repo_id(repo: str) -> str:
    if not REPO_ID.match(repo) or ".." in repo or repo.endswith((".git", ".")):
        raise UserError(f"--push_to_hub {repo!r} is not a Hub model repository name: give OWNER/NAME (or NAME) of "
                        "letters, digits, '-', '_' and '.'")
    return repo


def push_to_hub(folder: str | Path, repo: str, private: bool = False, token: str | None = None) -> str:
    """Upload an export folder to the Hub model repository `repo` (created when missing; `private`
    applies to a new one) and return its URL. Offline, unauthorised or refused: one UserError line."""
    check_repo_id(repo)
    folder = Path(folder)
    endpoint = hub_endpoint()
    require_hub(f"--push_to_hub {repo}", f"the export in {folder} is complete; push it later from a machine that "
                f"reaches the Hub (`hf upload {repo} {folder}`)")
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(repo_id=url.repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=f"Blueberry export ({folder.name})")
    except Exception as e:  # HTTP errors (401, 403, 404), lost connections: any of them is the user's to fix
        status = getattr(getattr(e, "response", None), "status_code", None)
        hint = ("; log in with `hf auth login` or set HF_TOKEN to a token that can write to it"
                if status in (401, 403) else "")
        raise UserError(f"could not push {folder} to {repo} on {endpoint} ({hub_failure(e)[0]}){hint}") from None
    return f"{endpoint.rstrip('/')}/{url.repo_id}"
