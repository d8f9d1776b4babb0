"""Tokenizers: our byte-level BPE with the chat format's special tokens and template, or a pretrained
model's own tokenizer adopted as it is. Everything downstream asks the tokenizer, never our constants,
for the chat format: the template renders turns, `end_of_turn_id` is the token that closes a reply (where
generation stops), `preamble_ids` is what the template puts before the first turn (our `<|bos|>`)."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from chatforge.chat_format import BOS, CHAT_TEMPLATE, EOS, PAD, SPECIAL_TOKENS
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


_PROBE = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]


def end_of_turn_id(tokenizer) -> int:
    """The special token the chat template writes right after a reply (ours `<|end|>`, ChatML's `<|im_end|>`,
    Llama 3's `<|eot_id|>`); eos when the template closes replies with plain text."""
    text = tokenizer.apply_chat_template(_PROBE, tokenize=False)
    after_reply = text[text.rindex("pong") + len("pong"):]
    special = set(tokenizer.all_special_ids)
    for token in tokenizer(after_reply, add_special_tokens=False)["input_ids"]:
        if token in special:
            return token
    return tokenizer.eos_token_id


def chat_text(tokenizer, messages: list[dict], generation_prompt: bool = False, template: str | None = None) -> str:
    """The template's rendering of `messages` (or another `template`'s, with this tokenizer's special tokens), as
    apply_chat_template renders it, also for no message at all (which apply_chat_template refuses)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(conversations=[messages], chat_template=template or tokenizer.get_chat_template(),
                                        add_generation_prompt=generation_prompt, **tokenizer.special_tokens_map)
    return rendered[0]


def preamble_text(tokenizer, template: str | None = None) -> str:
    """What the template writes before the first turn (ours: `<|bos|>`; ChatML: nothing)."""
    try:
        return chat_text(tokenizer, [], template=template)
    except Exception:  # a template that indexes messages[0] cannot render nothing: it has no preamble
        return ""


def preamble_ids(tokenizer) -> list[int]:
    text = preamble_text(tokenizer)
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def adopt_tokenizer(folder: str | Path, init: str) -> tuple[PreTrainedTokenizerFast, list[str]]:
    """A pretrained model's tokenizer, kept as it is except where the pipeline needs more; returns the
    tokenizer and the tokens added (the pretrain stage grows the model's embeddings by as many).

    - No chat template: ours is added with its special tokens (`<|user|>`, `<|end|>`, ...).
    - No pad token, or pad equal to eos or to the end of a turn: `<|pad|>` is added (the reward model pools
      at the last non-pad token, and generation must tell padding from a finished reply).
    """
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    where = f"params.yaml: model.init={init}"
    added: list[str] = []
    if tokenizer.chat_template is None:
        if not tokenizer.is_fast:
            raise ChatforgeError(f"{where}: its tokenizer has no chat template, and ours cannot be added to a slow "
                                 f"tokenizer; give the model a chat_template in tokenizer_config.json")
        vocab = tokenizer.get_vocab()
        added += [token for token in SPECIAL_TOKENS if token not in vocab and token not in (PAD, BOS)]
        tokenizer.add_special_tokens({"additional_special_tokens": added}, replace_extra_special_tokens=False)
        if tokenizer.bos_token is None:  # our template starts every conversation with the bos token
            tokenizer.add_special_tokens({"bos_token": BOS})
            added.append(BOS)
        tokenizer.chat_template = CHAT_TEMPLATE
    try:
        end_of_turn = end_of_turn_id(tokenizer)
    except Exception as error:  # a template that cannot render a user turn and a reply
        raise ChatforgeError(f"{where}: its chat template cannot render a user turn and a reply ({error}); "
                             f"fix the template in tokenizer_config.json") from None
    if end_of_turn is None:
        raise ChatforgeError(f"{where}: its chat template closes a reply with no special token and the tokenizer "
                             f"has no eos token; generation could never stop: give it an eos token")
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in (tokenizer.eos_token_id, end_of_turn):
        tokenizer.add_special_tokens({"pad_token": PAD})
        added.append(PAD)
    tokenizer.padding_side = "right"
    return tokenizer, added


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


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE's printable stand-in for each byte (GPT-2's `bytes_to_unicode`), as char → byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    stand_ins = {byte: chr(byte) for byte in printable}
    for shift, byte in enumerate(byte for byte in range(256) if byte not in stand_ins):
        stand_ins[byte] = chr(256 + shift)
    return {char: byte for byte, char in stand_ins.items()}


class TokenBytes:
    """The exact bytes a token id stands for: a byte-level BPE token may hold part of a UTF-8 character, which
    decoding it alone would turn into U+FFFD. Special tokens, and tokenizers that are not byte-level, give
    their decoded text."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = frozenset(tokenizer.all_special_ids)
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_of = _byte_level_alphabet() if isinstance(decoder, decoders.ByteLevel) else None

    def __call__(self, token_id: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if self.byte_of is not None and token_id not in self.special and all(c in self.byte_of for c in piece):
            return bytes(self.byte_of[c] for c in piece)
        return self.tokenizer.decode([token_id]).encode("utf-8")
