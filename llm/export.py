"""Blueberry as a Hugging Face `transformers` model: the same weights under a standard layout.

QK-norm + SwiGLU is Qwen3's layout (per-head RMSNorm on queries and keys before RoPE); without
QK-norm it is Llama's. Both rotate the two halves of each head (i, i + D/2), as shared.blocks
does, with the same inverse frequencies, so the weights move over unchanged. The squared-ReLU MLP
has no standard architecture and is refused.
"""

from __future__ import annotations

import torch

from shared.errors import UserError

from .model import Decoder
from .tokenizer import TextTokenizer


def check_exportable(model: Decoder) -> None:
    c = model.cfg
    options = [name for name in ("mlp_hidden_last", "depth_init", "gated_attn", "sandwich_norm", "embed_scale",
                                 "value_embeds", "residual_scalars", "logit_softcap") if getattr(c, name)]
    if options:
        raise UserError(f"this run uses {', '.join('model.' + o for o in options)}, which Qwen3/Llama cannot express; "
                        "export maps the default architecture only")
    if model.cfg.moe_experts:
        raise UserError("this run is a mixture of experts: export maps dense models only (Qwen3/Llama); "
                        "a Qwen3-MoE mapping is not written yet")
    if model.cfg.mlp != "swiglu":
        raise UserError(f"this run's MLP is {model.cfg.mlp!r}: the squared-ReLU MLP has no standard Hugging Face "
                        "architecture; export needs model.mlp = \"swiglu\" (the blueberry-151m preset)")


def hf_config(model: Decoder, tok: TextTokenizer) -> dict:
    c = model.cfg
    arch = "Qwen3" if c.qk_norm else "Llama"
    config = {
        "architectures": [f"{arch}ForCausalLM"], "model_type": arch.lower(),
        "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": c.mlp_hidden,
        "num_hidden_layers": c.n_layers, "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads,
        "head_dim": c.d_model // c.n_heads, "hidden_act": "silu", "max_position_embeddings": model.max_seq_len,
        "rms_norm_eps": model.norm.eps, "tie_word_embeddings": c.tie_embeddings, "attention_bias": False,
        "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "bos_token_id": tok.eos_id, "eos_token_id": tok.eos_id, "torch_dtype": "float32",
    }
    if arch == "Llama":
        config["mlp_bias"] = False
    return config


def hf_state_dict(model: Decoder) -> dict[str, torch.Tensor]:
    """Our parameter names mapped to transformers'; a tied output layer is stored once (as embed_tokens)."""
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
            "model_max_length": model.max_seq_len, "clean_up_tokenization_spaces": False}
