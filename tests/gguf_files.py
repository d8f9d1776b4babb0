"""A tiny GGUF of an architecture transformers cannot load, written by the tests themselves (never downloaded).

GGUFs of our own models come from `chatforge.export.write_gguf` (f32 for an exact round trip).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGUFWriter, LlamaFileType, TokenType

UNSUPPORTED_ARCH = "rwkv7"  # a llama.cpp architecture that transformers cannot load from GGUF


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
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
