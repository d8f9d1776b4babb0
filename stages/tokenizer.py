"""tokenizer: byte-level BPE trained on the train split, or the pretrained model's own tokenizer when
`model.init` is not scratch → models/tokenizer/, reports/tokenizer.json."""
from __future__ import annotations

from dataclasses import dataclass

from chatforge.console import log, run_stage, stage_seconds
from chatforge.corpus import read_texts
from chatforge.errors import ChatforgeError
from chatforge.files import atomic_path, write_json
from chatforge.modeling import ModelConfig
from chatforge.params import load_params, require, section
from chatforge.pretrained import is_scratch, resolve
from chatforge.tokenization import adopt_tokenizer, end_of_turn_id, measure, train_tokenizer

OUTPUT_DIR = "models/tokenizer"
REPORT = "reports/tokenizer.json"


@dataclass
class TokenizerConfig:
    """params.yaml section `tokenizer` (used when model.init is scratch)."""

    vocab_size: int = 1024
    min_frequency: int = 2

    def validate(self, name: str) -> None:
        require(self.vocab_size >= 300, f"{name}.vocab_size", "must be at least 300 (256 bytes + specials + merges)")
        require(self.min_frequency >= 1, f"{name}.min_frequency", "must be at least 1")


def main() -> None:
    params = load_params()
    config = section(TokenizerConfig, "tokenizer", params)
    model = section(ModelConfig, "model", params)
    if is_scratch(model.init):
        train_texts = read_texts("train")
        if not train_texts:
            raise ChatforgeError("data/clean/train.jsonl and documents_train.jsonl hold no text; check the clean stage")
        log("tokenizer", f"training byte-level BPE (vocab {config.vocab_size}, min frequency {config.min_frequency}) "
                         f"on {len(train_texts):,} train texts")
        tokenizer, added = train_tokenizer(train_texts, config.vocab_size, config.min_frequency), []
        origin = {"train_texts": len(train_texts)}
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
    write_json(REPORT, {
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
