"""Byte-level BPE tokenizer with the chat format's special tokens and template."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from chatforge.chat_format import BOS, CHAT_TEMPLATE, END_OF_TURN, EOS, PAD, SPECIAL_TOKENS
from chatforge.errors import ChatforgeError


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `texts`: every byte sequence round-trips exactly (no normalizer)."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (BOS, EOS, PAD)],
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(path: str | Path, stage_hint: str = "tokenizer") -> PreTrainedTokenizerFast:
    """Load a saved tokenizer; a missing or broken directory is one clear line, not a traceback."""
    path = Path(path)
    if not (path / "tokenizer.json").exists():
        raise ChatforgeError(f"{path}: no tokenizer.json; run `dvc repro {stage_hint}` first")
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.chat_template is None:
        raise ChatforgeError(f"{path}: tokenizer has no chat template; rebuild it with `dvc repro tokenizer`")
    return tokenizer


def end_of_turn_id(tokenizer) -> int:
    return tokenizer.convert_tokens_to_ids(END_OF_TURN)


def measure(tokenizer, texts: list[str]) -> dict:
    """Bytes per token and round-trip exactness (decode(encode(x)) == x) over `texts`."""
    encodings = tokenizer(texts, add_special_tokens=False)["input_ids"]
    failures = [text for text, ids in zip(texts, encodings) if tokenizer.decode(ids) != text]
    tokens = sum(len(ids) for ids in encodings)
    text_bytes = sum(len(text.encode("utf-8")) for text in texts)
    return {
        "texts": len(texts),
        "tokens": tokens,
        "bytes": text_bytes,
        "bytes_per_token": round(text_bytes / max(tokens, 1), 4),
        "roundtrip_exact": round(1 - len(failures) / max(len(texts), 1), 6),
        "roundtrip_failures": len(failures),
        "first_failure": failures[0][:200] if failures else None,
    }
