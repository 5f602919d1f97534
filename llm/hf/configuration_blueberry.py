"""Configuration of a Blueberry decoder exported for Hugging Face `transformers` (trust_remote_code).

Standalone: imports only transformers, never the Blueberry project, so the file works inside an
exported folder or a Hub repository. Written for transformers 4.5x and 5.x.
"""

from transformers import PretrainedConfig


class BlueberryConfig(PretrainedConfig):
    model_type = "blueberry"

    def __init__(self, vocab_size=320, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, mlp="relu2", intermediate_size=512, intermediate_sizes=None, qk_norm=True,
                 tie_embeddings=True, rope_theta=10_000.0, rms_norm_eps=1e-6, max_position_embeddings=128,
                 embed_scale=False, logit_softcap=0.0, sandwich_norm=False, gated_attn=False,
                 residual_scalars=False, value_embeds=0, embed_norm=False, smear=False, smear_channels=24,
                 value_gate=False, value_gate_channels=12, qk_scale=1.0, **kwargs):
        if mlp not in ("relu2", "swiglu"):
            raise ValueError(f"mlp must be 'relu2' or 'swiglu', got {mlp!r}")
        if hidden_size % num_attention_heads or num_attention_heads % num_key_value_heads:
            raise ValueError("num_attention_heads must divide hidden_size and num_key_value_heads num_attention_heads")
        self.vocab_size, self.hidden_size, self.num_hidden_layers = vocab_size, hidden_size, num_hidden_layers
        self.num_attention_heads, self.num_key_value_heads = num_attention_heads, num_key_value_heads
        self.head_dim = hidden_size // num_attention_heads
        self.mlp, self.intermediate_size = mlp, intermediate_size
        # per-layer MLP widths (a pyramid when they differ); default: intermediate_size everywhere
        self.intermediate_sizes = list(intermediate_sizes or [intermediate_size] * num_hidden_layers)
        if len(self.intermediate_sizes) != num_hidden_layers:
            raise ValueError(f"intermediate_sizes has {len(self.intermediate_sizes)} widths for {num_hidden_layers} layers")
        self.qk_norm, self.tie_embeddings = qk_norm, tie_embeddings
        self.rope_theta, self.rms_norm_eps, self.max_position_embeddings = rope_theta, rms_norm_eps, max_position_embeddings
        self.embed_scale, self.logit_softcap, self.sandwich_norm = embed_scale, logit_softcap, sandwich_norm
        self.gated_attn, self.residual_scalars, self.value_embeds = gated_attn, residual_scalars, value_embeds
        self.embed_norm, self.qk_scale = embed_norm, qk_scale
        # the smear and value gates read the first *_channels channels of their input
        self.smear, self.smear_channels = smear, smear_channels
        self.value_gate, self.value_gate_channels = value_gate, value_gate_channels
        # the model computes a tied head from the embedding itself and holds no lm_head then: transformers'
        # own tying (which differs between 4.x and 5.x) is kept out of it
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
