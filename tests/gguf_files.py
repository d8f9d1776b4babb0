"""Tiny GGUF files written by the tests themselves (never downloaded), in llama.cpp's conventions.

`write_llama_gguf` turns a small transformers `LlamaForCausalLM` and its byte-level BPE fast tokenizer into
the F32 GGUF that llama.cpp's converter would make of them, so that transformers' GGUF loader gives the same
weights and the same tokenizer back. `write_unsupported_gguf` writes a valid GGUF of an architecture that
transformers' GGUF loader rejects.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, TokenType

UNSUPPORTED_ARCH = "rwkv7"  # a llama.cpp architecture that transformers cannot load from GGUF

# transformers name (inside model.layers.N.) -> llama.cpp name (inside blk.N.)
_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's rotary halves (HF's rotate_half layout) interleaved in pairs,
    which is what its rope kernel expects. transformers' loader undoes exactly this."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _write_tokenizer(writer: GGUFWriter, tokenizer, vocab_size: int) -> None:
    """A byte-level BPE vocabulary as llama.cpp stores it: model `gpt2`, the tokens in id order (spelled in
    the GPT-2 byte alphabet, as in tokenizer.json), their types (special tokens CONTROL, other added tokens
    USER_DEFINED, padding rows UNUSED as `[PADn]`), the merges as "a b" strings, the special token ids, the
    add-bos/eos flags and the chat template."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    if backend["model"]["type"] != "BPE":
        raise ValueError(f"write_llama_gguf wants a byte-level BPE tokenizer, not {backend['model']['type']}")
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))) or len(tokens) > vocab_size:
        raise ValueError("the tokenizer's ids must be 0..n-1, at most the model's vocab_size")
    special, added = set(tokenizer.all_special_ids), set(tokenizer.added_tokens_decoder)
    types = [TokenType.CONTROL if i in special else TokenType.USER_DEFINED if i in added else TokenType.NORMAL
             for i in range(len(tokens))]
    padding = range(len(tokens), vocab_size)
    tokens += [f"[PAD{i}]" for i in padding]
    types += [TokenType.UNUSED for _ in padding]
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]

    writer.add_tokenizer_model("gpt2")
    # `gpt-2` is llama.cpp's name for the GPT-2 split regex (a ByteLevel pre-tokenizer with use_regex=True);
    # transformers has no override for it, so it keeps GPT2Tokenizer's own ByteLevel pre-tokenizer.
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        if getattr(tokenizer, f"{name}_token_id") is not None:
            add(getattr(tokenizer, f"{name}_token_id"))
    # explicit flags: a loader that finds none may add a BOS the original tokenizer never did
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def write_llama_gguf(path: str | Path, model, tokenizer) -> Path:
    """Write `model` (a LlamaForCausalLM) and `tokenizer` to `path` as an all-F32 llama.cpp GGUF.

    Conventions: architecture `llama` with its `llama.*` hyperparameter keys; tensors named `token_embd`,
    `blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,ffn_norm,ffn_gate,ffn_up,ffn_down}`, `output_norm`
    and `output` (left out when tied to the embedding, which is how a reader tells the two apart); q and k
    rows permuted for llama.cpp's rope. numpy arrays go in torch's shape order; GGUFWriter reverses them.
    """
    path = Path(path)
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))

    writer = GGUFWriter(str(path), "llama")
    writer.add_name(getattr(config, "_name_or_path", "") or "tiny-llama")
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    _write_tokenizer(writer, tokenizer, config.vocab_size)

    weights = {name: tensor.detach().float().cpu().numpy() for name, tensor in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for layer in range(config.num_hidden_layers):
        for hf_name, gguf_name in _LAYER_TENSORS.items():
            weight = weights[f"model.layers.{layer}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = _rope_permute(weight, heads)
            elif gguf_name == "attn_k":
                weight = _rope_permute(weight, kv_heads)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", np.ascontiguousarray(weight))
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    if not config.tie_word_embeddings:
        writer.add_tensor("output.weight", weights["lm_head.weight"])
    _finish(writer)
    return path


def write_unsupported_gguf(path: str | Path, architecture: str = UNSUPPORTED_ARCH) -> Path:
    """A minimal valid GGUF of `architecture` (default rwkv7, which llama.cpp knows and transformers' GGUF
    loader does not): a five-token byte-level vocabulary and one F32 `token_embd.weight`."""
    path = Path(path)
    tokens = ["<|eos|>", "a", "b", "c", "ab"]
    writer = GGUFWriter(str(path), architecture)
    writer.add_name("tiny-unsupported")
    writer.add_file_type(LlamaFileType.ALL_F32)
    writer.add_embedding_length(4)
    writer.add_block_count(0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_types([int(TokenType.CONTROL)] + [int(TokenType.NORMAL)] * 4)
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(0)
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 4), dtype=np.float32))
    _finish(writer)
    return path


def _finish(writer: GGUFWriter) -> None:
    """GGUF layout: header, key/values, tensor table, then the (aligned) tensor data."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
