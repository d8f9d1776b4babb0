"""pretrain: a Llama-style base model trained on the train token shards (data/tokens, written by the tokenize
stage) → models/init/ (the start), models/base/, reports/pretrain.json, reports/live/pretrain/.

With a pretrained `model.init` this is continued pretraining of that model on our text for
`pretrain.max_steps` steps (0: none; the stage still evaluates it, compares it with the n-gram and writes
models/base).

Resumable: a run killed mid-way continues from models/base_checkpoint/ when started again with the
same params, tokenizer and data. Runs unchanged under `accelerate launch`.
"""
from __future__ import annotations

from pathlib import Path

from chatforge.console import log, run_stage
from chatforge.modeling import ModelConfig
from chatforge.params import load_params, section
from chatforge.provenance import write_report
from chatforge.token_shards import TOKENS_DIR
from chatforge.training.pretrain import STAGE, PretrainConfig, train_base

TOKENIZER_DIR = Path("models/tokenizer")
OUTPUT_DIR = Path("models/base")
INIT_DIR = Path("models/init")
CHECKPOINT_DIR = Path("models/base_checkpoint")
REPORT = Path("reports/pretrain.json")
LIVE_DIR = Path("reports/live/pretrain")


def main() -> None:
    params = load_params()
    model_config = section(ModelConfig, "model", params)
    config = section(PretrainConfig, "pretrain", params)

    report = train_base(model_config, config, TOKENIZER_DIR, TOKENS_DIR, INIT_DIR, OUTPUT_DIR, LIVE_DIR,
                        CHECKPOINT_DIR)
    if report is None:  # not the main process under `accelerate launch`
        return

    write_report(REPORT, report)
    log(STAGE, f"val loss {report['val_loss']:.4f}, {report['val_bits_per_byte']:.4f} bits/byte; "
               f"{report['ngram_order']}-gram Kneser-Ney baseline {report['ngram_val_bits_per_byte']:.4f} bits/byte "
               f"({report['ngram_seconds']:.1f}s); wrote {INIT_DIR}/ (the start), {OUTPUT_DIR}/, {REPORT}, {LIVE_DIR}/")


main = run_stage(main)

if __name__ == "__main__":
    main()
