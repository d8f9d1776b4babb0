"""tokenize: the train and val texts through models/tokenizer, packed with eos between records, as token
shards → data/tokens/ (parts and manifest.json), reports/tokenize.json.

Pretraining reads these shards, so turning a `model` or `pretrain` knob never tokenizes again. (This file is not
named tokenize.py: `python stages/tokenize.py` would shadow the standard library's tokenize module.)
"""
from __future__ import annotations

from pathlib import Path

from chatforge.console import log, run_stage, stage_seconds
from chatforge.params import load_params, section
from chatforge.provenance import write_report
from chatforge.token_shards import SPLITS, STAGE, TOKENS_DIR, TokenizeConfig, tokenize_corpus
from chatforge.tokenization import load_tokenizer

TOKENIZER_DIR = Path("models/tokenizer")
REPORT = "reports/tokenize.json"


def main() -> None:
    config = section(TokenizeConfig, "tokenize", load_params())
    tokenizer = load_tokenizer(TOKENIZER_DIR)
    manifest = tokenize_corpus(tokenizer, TOKENIZER_DIR / "tokenizer.json", TOKENS_DIR, config)

    splits = manifest["splits"]
    for split in SPLITS:
        counts = splits[split]
        log(STAGE, f"{split}: read {counts['texts']:,} texts ({counts['bytes']:,} bytes), wrote "
                   f"{counts['tokens']:,} tokens in {len(counts['shards'])} part(s) of {manifest['dtype']}")
    write_report(REPORT, {
        "dtype": manifest["dtype"],
        "vocab_size": manifest["vocab_size"],
        **{split: {key: splits[split][key] for key in ("texts", "tokens", "bytes")}
           | {"shards": len(splits[split]["shards"])} for split in SPLITS},
        "wall_seconds": stage_seconds(),
    })
    log(STAGE, f"wrote {TOKENS_DIR}/ and {REPORT}")


main = run_stage(main)

if __name__ == "__main__":
    main()
