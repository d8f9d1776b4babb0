"""The decoder: a Llama-style causal LM (RoPE, RMSNorm, SwiGLU) sized by one dial, `depth`.

As in nanochat, the width grows with the depth (`hidden_size = depth * aspect_ratio`), heads have a
fixed size (`num_heads = hidden_size / head_dim`) and the MLP is a fixed multiple of the width. SwiGLU
has three matrices instead of two, so its hidden size is 8/3 of the width (same parameters and FLOPs
as a 4x MLP), rounded up to `mlp_multiple_of` for matmul-friendly shapes. Every derived value can be
set explicitly in params.yaml instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from chatforge.params import require


@dataclass
class ModelConfig:
    """params.yaml section `model`. Derived sizes are null unless overridden.

    `init` other than `scratch` starts from pretrained weights (chatforge/pretrained.py): the architecture is
    then the pretrained model's, and of the knobs below only `context_length` (the training window) applies."""

    init: str = "scratch"           # scratch | a preset (smollm2-135m) | a model folder | a .gguf file | a hub id
    revision: str | None = None     # a hub id's branch, tag or commit
    depth: int = 4
    aspect_ratio: int = 64          # hidden_size = depth * aspect_ratio
    head_dim: int = 64
    mlp_ratio: float = 8 / 3        # SwiGLU hidden size / width
    mlp_multiple_of: int = 64
    num_layers: int | None = None   # default: depth
    hidden_size: int | None = None  # default: depth * aspect_ratio
    num_heads: int | None = None    # default: hidden_size / head_dim
    num_kv_heads: int | None = None  # default: num_heads (no grouped-query attention)
    intermediate_size: int | None = None  # default: mlp_ratio * hidden_size, rounded up
    context_length: int = 256
    dropout: float = 0.0            # attention dropout (Llama has no other dropout)
    tie_embeddings: bool = True
    zero_init_projections: bool = True  # blocks' output projections start at 0 (`zero_residual_projections`)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    initializer_range: float = 0.02

    def validate(self, section: str) -> None:
        require(self.depth >= 1, f"{section}.depth", "must be at least 1")
        require(self.aspect_ratio >= 1 and self.head_dim >= 1, f"{section}.aspect_ratio/head_dim", "must be positive")
        require(self.context_length >= 2, f"{section}.context_length", "must be at least 2")
        require(0.0 <= self.dropout < 1.0, f"{section}.dropout", "must be in [0, 1)")
        hidden, heads, kv_heads = self.resolved_hidden_size, self.resolved_num_heads, self.resolved_num_kv_heads
        require(hidden % heads == 0, f"{section}.num_heads",
                f"({heads}) must divide hidden_size ({hidden}); set model.num_heads or model.hidden_size")
        require(heads % kv_heads == 0, f"{section}.num_kv_heads", f"({kv_heads}) must divide num_heads ({heads})")
        require((hidden // heads) % 2 == 0, f"{section}.num_heads", "must leave an even head size (RoPE rotates pairs)")

    @property
    def resolved_num_layers(self) -> int:
        return self.num_layers or self.depth

    @property
    def resolved_hidden_size(self) -> int:
        return self.hidden_size or self.depth * self.aspect_ratio

    @property
    def resolved_num_heads(self) -> int:
        return self.num_heads or max(1, self.resolved_hidden_size // self.head_dim)

    @property
    def resolved_num_kv_heads(self) -> int:
        return self.num_kv_heads or self.resolved_num_heads

    @property
    def resolved_intermediate_size(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        raw = self.mlp_ratio * self.resolved_hidden_size
        return self.mlp_multiple_of * math.ceil(raw / self.mlp_multiple_of)

    def to_llama_config(self, tokenizer):
        """A transformers LlamaConfig with the special-token ids of `tokenizer` (pad distinct from eos)."""
        from transformers import LlamaConfig

        if tokenizer.pad_token_id is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
            raise ValueError("the tokenizer's pad token must exist and differ from its eos token")
        hidden, heads = self.resolved_hidden_size, self.resolved_num_heads
        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=self.resolved_intermediate_size,
            num_hidden_layers=self.resolved_num_layers,
            num_attention_heads=heads,
            num_key_value_heads=self.resolved_num_kv_heads,
            head_dim=hidden // heads,
            max_position_embeddings=self.context_length,
            attention_dropout=self.dropout,
            rms_norm_eps=self.rms_norm_eps,
            initializer_range=self.initializer_range,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
            tie_word_embeddings=self.tie_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
        )


def training_window(model) -> int:
    """Tokens per training and evaluation window: `model.context_length` as the pipeline saved it with a
    pretrained init (`training_window` in config.json), else the model's context."""
    config = model.config
    return int(getattr(config, "training_window", None) or config.max_position_embeddings)


def generation_config(tokenizer):
    """Generation stops at the end of a turn or at the end of a text; pad is its own id."""
    from transformers import GenerationConfig

    from chatforge.tokenization import end_of_turn_id

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[end_of_turn_id(tokenizer), tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
    )


def load_initial_model(config: ModelConfig, tokenizer):
    """The pretrained model of `config.init` (fp32), its embeddings grown to the tokens the tokenizer stage
    added (new rows start at the mean embedding, as transformers does), its special ids set to ours, and
    `config.context_length` (at most its own context) recorded as its `training_window`."""
    import torch
    from transformers import AutoModelForCausalLM

    from chatforge.errors import ChatforgeError
    from chatforge.pretrained import resolve

    folder = resolve(config.init, config.revision)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, use_safetensors=True,
                                                     trust_remote_code=False)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ChatforgeError(f"params.yaml: model.init={config.init}: transformers cannot load it as a causal LM "
                             f"({first}); use a model of an architecture transformers supports") from None
    context = model.config.max_position_embeddings
    if config.context_length > context:
        raise ChatforgeError(f"params.yaml: model.context_length={config.context_length} is longer than the context "
                             f"of model.init={config.init} ({context}); set it to at most {context}")
    # The pipeline trains and evaluates in windows of model.context_length (a 135M model evaluated in 8192-token
    # windows would need ~26 GB of logits); the model keeps its own context for chat, serve and other tools.
    if config.context_length < context:
        model.config.training_window = config.context_length
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.update({"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                         "eos_token_id": tokenizer.eos_token_id})
    return model


def build_model(config: ModelConfig, tokenizer, seed: int):
    """A freshly initialized LlamaForCausalLM (SDPA attention), deterministic for `seed`."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(config.to_llama_config(tokenizer), attn_implementation="sdpa")
    if config.zero_init_projections:
        zero_residual_projections(model)
    return model


def zero_residual_projections(model) -> None:
    """Zero the matrices that write into the residual stream (attention's o_proj, the MLP's down_proj), as
    modded-nanogpt and nanochat do: every block starts as the identity and learns what to add. Their
    gradients are not zero (their inputs are not), so they move on the first step and the rest of each block
    on the next. In the 4-minute default this lowered val bits per byte by 4% (docs/pretraining.md)."""
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()


def count_parameters(model) -> int:
    """Distinct parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in model.parameters())


def save_model(directory, model, tokenizer) -> None:
    """A causal LM with its tokenizer and our stop rule, written atomically (safetensors), loadable by plain
    transformers."""
    from chatforge.files import atomic_path

    with atomic_path(directory, is_dir=True) as tmp:
        model.generation_config = generation_config(tokenizer)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
