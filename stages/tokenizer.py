"""tokenizer: byte-level BPE trained on the train split (streamed, its first `tokenizer.max_train_bytes`), or the
pretrained model's own tokenizer when `model.init` is not scratch → models/tokenizer/, reports/tokenizer.json."""
from __future__ import annotations

from dataclasses import dataclass

from chatforge.console import log, run_stage, stage_seconds
from chatforge.corpus import ByteCappedTexts, iter_texts, read_texts
from chatforge.errors import ChatforgeError
from chatforge.files import atomic_path
from chatforge.modeling import ModelConfig
from chatforge.params import load_params, require, section
from chatforge.pretrained import is_scratch, resolve
from chatforge.provenance import write_report
from chatforge.tokenization import adopt_tokenizer, end_of_turn_id, measure, train_tokenizer

OUTPUT_DIR = "models/tokenizer"
REPORT = "reports/tokenizer.json"


@dataclass
class TokenizerConfig:
    """params.yaml section `tokenizer` (used when model.init is scratch)."""

    vocab_size: int = 1024
    min_frequency: int = 2
    max_train_bytes: int | None = None  # train on the first this many bytes of train text; None: all of it

    def validate(self, name: str) -> None:
        require(self.vocab_size >= 300, f"{name}.vocab_size", "must be at least 300 (256 bytes + specials + merges)")
        require(self.min_frequency >= 1, f"{name}.min_frequency", "must be at least 1")
        require(self.max_train_bytes is None or self.max_train_bytes >= 1, f"{name}.max_train_bytes",
                "must be at least 1, or null for all the train text")


def main() -> None:
    params = load_params()
    config = section(TokenizerConfig, "tokenizer", params)
    model = section(ModelConfig, "model", params)
    if is_scratch(model.init):
        cap = "all" if config.max_train_bytes is None else f"at most {config.max_train_bytes:,} bytes of"
        log("tokenizer", f"training byte-level BPE (vocab {config.vocab_size}, min frequency {config.min_frequency}) "
                         f"on {cap} the train text")
        train_texts = ByteCappedTexts(iter_texts("train"), config.max_train_bytes)  # streamed, never a list
        tokenizer, added = train_tokenizer(train_texts, config.vocab_size, config.min_frequency), []
        if not train_texts.texts:
            raise ChatforgeError(
                "data/clean/train.jsonl and documents_train.jsonl hold no text; check the clean stage"
                if config.max_train_bytes is None else
                f"params.yaml: tokenizer.max_train_bytes={config.max_train_bytes} is less than the first train "
                f"text; raise it")
        log("tokenizer", f"trained on {train_texts.texts:,} train texts ({train_texts.bytes:,} bytes)")
        origin = {"train_texts": train_texts.texts, "train_bytes": train_texts.bytes}
    else:
        tokenizer, added = adopt_tokenizer(resolve(model.init, model.revision), model.init)
        origin = {"adopted_from": model.init, "added_tokens": added}
        log("tokenizer", f"adopted the tokenizer of model.init={model.init} (vocab {len(tokenizer):,}; "
                         f"added {', '.join(added) or 'nothing'}); tokenizer.vocab_size does not apply")

    val = measure(tokenizer, read_texts("val"))
    log("tokenizer", f"vocab {len(tokenizer):,}; val: {val['bytes_per_token']} bytes/token, "
                     f"round trip exact on {val['roundtrip_exact']:.2%} of {val['texts']:,} texts")
    if val["roundtrip_failures"]:
        if is_scratch(model.init):
            raise ChatforgeError(f"tokenizer: decode(encode(x)) != x for {val['roundtrip_failures']} val texts, "
                                 f"first: {val['first_failure']!r}; the tokenizer must be lossless")
        log("tokenizer", f"the adopted tokenizer does not round-trip {val['roundtrip_failures']} val texts "
                         f"(first: {val['first_failure']!r}); reported, not fixed: it is the model's own")

    with atomic_path(OUTPUT_DIR, is_dir=True) as tmp:
        tokenizer.save_pretrained(tmp)
    write_report(REPORT, {
        "vocab_size": len(tokenizer),
        "requested_vocab_size": config.vocab_size,
        **origin,
        "special_token_ids": {"pad": tokenizer.pad_token_id, "bos": tokenizer.bos_token_id,
                              "eos": tokenizer.eos_token_id, "end_of_turn": end_of_turn_id(tokenizer)},
        "val": val,
        "wall_seconds": stage_seconds(),
    })
    log("tokenizer", f"wrote {OUTPUT_DIR}/ and {REPORT}")


main = run_stage(main)

if __name__ == "__main__":
    main()
