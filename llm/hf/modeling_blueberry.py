"""A Blueberry decoder for Hugging Face `transformers` (AutoModelForCausalLM, trust_remote_code=True).

Standalone: imports only torch and transformers, never the Blueberry project, so it runs inside an
exported folder or a Hub repository. Its forward pass is llm/model.py's, operation for operation:
pre-norm blocks with torch's RMSNorm, grouped-query attention through scaled_dot_product_attention,
optional per-head QK-norm before RoPE, rotary embeddings on the two halves of each head (i, i + D/2)
from inverse frequencies computed in float64, squared-ReLU or SwiGLU MLPs, and the architecture
options (embedding norm and scale, the previous-token smear, sandwich norms, gated attention,
the query/key scale, residual scalars, value embeddings and their gates, per-layer MLP widths,
logit soft-cap). A tied output layer is the embedding matrix itself.

generate() keeps a KV cache (transformers' DynamicCache, passed as `cache` or `past_key_values`):
each step feeds the new token only, and, with the smear, its predecessor's id as `prev_ids` (the
smear adds the previous token's embedding, which the cache does not hold). attention_mask handles
padding on either side: positions count the real tokens only, so a left-padded row gets the logits
of the same row unpadded.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_blueberry import BlueberryConfig

# transformers 5.2x names the KV cache `cache`; earlier releases `past_key_values` (both are accepted)
CACHE = "cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {}) else "past_key_values"


def rope_tables(length, head_dim, theta):
    """cos, sin [length, head_dim // 2] on the CPU: float64 angles rounded to float32, as the project
    computes them (on the CPU, then moved), so the tables are bit-identical on any device."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = (torch.arange(length).to(torch.float64)[:, None] * inv_freq[None, :]).float()
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """x [B, H, T, D] rotated by [T, D/2] tables, or [B, T, D/2] when each row has its own positions."""
    d = x.shape[-1] // 2
    x1, x2 = x[..., :d].float(), x[..., d:].float()
    if cos.ndim == 3:
        cos, sin = cos[:, None], sin[:, None]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).type_as(x)


class BlueberryRMSNorm(nn.RMSNorm):
    pass  # the name tells transformers' default initialisation that this is a norm (weight = 1)


def has_value_table(config, layer):
    """The first N layers and again the last N add a value embedding (N = config.value_embeds)."""
    n = config.value_embeds
    return n > 0 and (layer < n or layer >= config.num_hidden_layers - n)


class BlueberryAttention(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = config.num_attention_heads, config.num_key_value_heads, hd
        self.q = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.v = nn.Linear(d, self.n_kv_heads * hd, bias=False)
        self.o = nn.Linear(self.n_heads * hd, d, bias=False)
        eps = config.rms_norm_eps
        self.q_norm = BlueberryRMSNorm(hd, eps=eps) if config.qk_norm else nn.Identity()
        self.k_norm = BlueberryRMSNorm(hd, eps=eps) if config.qk_norm else nn.Identity()
        self.gate = nn.Linear(d, self.n_heads, bias=True) if config.gated_attn else None
        self.value_gate = None
        if config.value_gate and has_value_table(config, layer):
            self.value_gate = nn.Linear(min(d, config.value_gate_channels), self.n_kv_heads, bias=False)
        self.scale = config.qk_scale ** 2 / hd ** 0.5 if config.qk_scale != 1.0 else None  # None: SDPA's own

    def forward(self, x, rope, mask, value_extra=None, cache=None):
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x)
        if value_extra is not None:
            if self.value_gate is not None:  # per KV head, 3 sigmoid(...): from 0 to 3 times the table's row
                gate = 3 * torch.sigmoid(self.value_gate(x[..., :self.value_gate.in_features]))
                value_extra = (value_extra.view(b, t, self.n_kv_heads, -1) * gate[..., None]).flatten(2)
            v = v + value_extra
        v = v.view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k = q.to(v.dtype), k.to(v.dtype)  # QK-norm under autocast leaves them fp32
        if cache is not None:  # the keys and values of every position so far
            k, v = cache.update(k, v, self.layer)
        gqa = {"enable_gqa": True} if self.n_kv_heads != self.n_heads else {}
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, **gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale, **gqa)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x)).transpose(1, 2)[..., None]
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class BlueberryMLP(nn.Module):
    def __init__(self, dim, hidden, kind):
        super().__init__()
        self.kind = kind
        if kind == "swiglu":
            self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        if self.kind == "swiglu":
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.relu(self.up(x)).square())


class BlueberryBlock(nn.Module):
    def __init__(self, config, layer):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.norm1 = BlueberryRMSNorm(d, eps=eps)
        self.attn = BlueberryAttention(config, layer)
        self.norm2 = BlueberryRMSNorm(d, eps=eps)
        self.post_norm1 = BlueberryRMSNorm(d, eps=eps) if config.sandwich_norm else nn.Identity()
        self.post_norm2 = BlueberryRMSNorm(d, eps=eps) if config.sandwich_norm else nn.Identity()
        self.mlp = BlueberryMLP(d, config.intermediate_sizes[layer], config.mlp)

    def forward(self, x, rope, mask, value_extra=None, cache=None):
        x = x + self.post_norm1(self.attn(self.norm1(x), rope, mask, value_extra, cache))
        return x + self.post_norm2(self.mlp(self.norm2(x)))


class BlueberryPreTrainedModel(PreTrainedModel):
    config_class = BlueberryConfig
    base_model_prefix = "model"
    _no_split_modules = ["BlueberryBlock"]
    supports_gradient_checkpointing = False
    _supports_cache_class = True  # transformers 4.5x: generate() then passes a DynamicCache

    def _init_weights(self, module):
        # only for weights a checkpoint lacks (a fresh model): the export always holds every one
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.RMSNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
        elif isinstance(module, BlueberryModel) and module.config.residual_scalars:
            nn.init.ones_(module.resid_scale)
            nn.init.zeros_(module.x0_scale)
        if isinstance(module, BlueberryModel) and module.config.smear:
            nn.init.zeros_(module.smear_lambda)


class BlueberryModel(BlueberryPreTrainedModel):
    """The decoder up to the final norm: hidden states [B, T, D]."""

    def __init__(self, config):
        super().__init__(config)
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.hidden_size)
        self.blocks = nn.ModuleList(BlueberryBlock(c, i) for i in range(c.num_hidden_layers))
        kv_dim = c.num_key_value_heads * c.head_dim
        self.value_embeds = nn.ModuleList(nn.Embedding(c.vocab_size, kv_dim) for _ in range(c.value_embeds))
        if c.residual_scalars:
            self.resid_scale = nn.Parameter(torch.ones(c.num_hidden_layers))
            self.x0_scale = nn.Parameter(torch.zeros(c.num_hidden_layers))
        if c.smear:
            self.smear_gate = nn.Linear(min(c.hidden_size, c.smear_channels), 1, bias=False)
            self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.norm = BlueberryRMSNorm(c.hidden_size, eps=c.rms_norm_eps)
        self._rope = {}  # (device, length) -> tables; not buffers, so meta-device loading never touches them
        self.post_init()

    def get_input_embeddings(self):
        return self.tok_emb

    def set_input_embeddings(self, value):
        self.tok_emb = value

    def value_table(self, layer):
        """The value-embedding table of a layer: the first N layers and again the last N, or None."""
        if not has_value_table(self.config, layer):
            return None
        return layer if layer < self.config.value_embeds else layer - (self.config.num_hidden_layers - self.config.value_embeds)

    def smear(self, x, real):
        """Each position plus its predecessor times lambda * sigmoid(a gate on its first channels); the
        first token of a row, and one after padding (real [B, T] bool, or None), adds nothing."""
        cur, prev = x[:, 1:], x[:, :-1]
        gate = self.smear_lambda * torch.sigmoid(self.smear_gate(cur[..., :self.smear_gate.in_features]))
        if real is not None:
            gate = gate * real[:, :-1, None].to(gate.dtype)
        return torch.cat([x[:, :1], cur + gate * prev], 1)

    def rope(self, positions, t, device):
        """Tables [t, D/2] for positions 0..t-1, or [B, t', D/2] for position_ids [B, t'] below t."""
        length = max(self.config.max_position_embeddings, t)  # positions counted from a mask stay below t
        key = (str(device), length)
        if key not in self._rope:
            cos, sin = rope_tables(length, self.config.head_dim, self.config.rope_theta)
            self._rope = {key: (cos.to(device), sin.to(device))}  # one entry: a longer one replaces it
        cos, sin = self._rope[key]
        return (cos[:t], sin[:t]) if positions is None else (cos[positions], sin[positions])

    def embed(self, ids):
        x = self.tok_emb(ids)
        if self.config.embed_norm:
            x = F.rms_norm(x, (x.shape[-1],), eps=self.config.rms_norm_eps)
        return x * self.config.hidden_size ** 0.5 if self.config.embed_scale else x

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, prev_ids=None,
                **kwargs):
        """input_ids [B, t] after `past` cached positions; attention_mask [B, past + t]; prev_ids [B, 1]:
        the token before input_ids, which the smear needs when past > 0."""
        b, t = input_ids.shape
        device = input_ids.device
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        full = past + t
        real = attention_mask.bool() if attention_mask is not None and not bool(attention_mask.all()) else None
        if position_ids is None and real is not None:  # positions count real tokens: left padding shifts nothing
            position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
        elif position_ids is None and past:
            position_ids = torch.arange(past, full, device=device)[None].expand(b, -1)
        mask = None
        if real is not None or past:  # query i (at past + i) sees keys up to itself, real ones only
            q_pos, k_pos = torch.arange(past, full, device=device), torch.arange(full, device=device)
            mask = (k_pos[None, None] <= q_pos[None, :, None])
            if real is not None:
                mask = mask & real[:, None, :]
            mask = (mask | (k_pos[None, None] == q_pos[None, :, None]))[:, None]  # a padding query sees itself: no NaN
        rope = self.rope(position_ids, full, device)
        x = self.embed(input_ids)
        if self.config.smear:
            if past:
                if prev_ids is None:
                    raise ValueError("with past_key_values, the smear needs prev_ids: the token before input_ids")
                edge = real[:, past - 1:] if real is not None else None
                x = self.smear(torch.cat([self.embed(prev_ids), x], 1), edge)[:, 1:]
            else:
                x = self.smear(x, real)
        x0 = x
        for i, block in enumerate(self.blocks):
            if self.config.residual_scalars:
                x = self.resid_scale[i] * x + self.x0_scale[i] * x0
            table = self.value_table(i)
            ve = self.value_embeds[table](input_ids) if table is not None else None
            x = block(x, rope, mask, ve, past_key_values)
        return self.norm(x)


class BlueberryForCausalLM(BlueberryPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = BlueberryModel(config)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_emb

    def set_input_embeddings(self, value):
        self.model.tok_emb = value

    def get_output_embeddings(self):
        return None if self.config.tie_embeddings else self.lm_head

    def logits(self, h):
        weight = self.model.tok_emb.weight if self.config.tie_embeddings else self.lm_head.weight
        out = F.linear(h, weight)
        cap = self.config.logit_softcap
        return cap * torch.tanh(out.float() / cap) if cap else out

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, return_dict=None,
                cache=None, past_key_values=None, use_cache=None, prev_ids=None, **kwargs):
        kv = cache if cache is not None else past_key_values
        logits = self.logits(self.model(input_ids, attention_mask, position_ids, kv, prev_ids))
        loss = None
        if labels is not None:  # transformers' convention: labels are the inputs, shifted here; -100 is ignored
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        if return_dict is False:
            return (loss, logits) if loss is not None else (logits,)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: kv})

    def prepare_inputs_for_generation(self, input_ids, cache=None, past_key_values=None, attention_mask=None, **kwargs):
        # the cache holds the first `past` positions: feed the rest (the new token), and its predecessor for the smear
        kv = cache if cache is not None else past_key_values
        past = kv.get_seq_length() if kv is not None else 0
        inputs = {"input_ids": input_ids[:, past:], "attention_mask": attention_mask, CACHE: kv}
        if past and self.config.smear:
            inputs["prev_ids"] = input_ids[:, past - 1:past]
        return inputs
