"""pretrain: a Llama-style base model trained on the train token shards (data/tokens, written by the tokenize
stage) → models/base/, reports/pretrain.json.

With a pretrained `model.init` this is continued pretraining of that model on our text for
`pretrain.max_steps` steps (0: none; the stage still evaluates it, compares it with the n-gram and writes
models/base).

Resumable: a run killed mid-way continues from models/base_checkpoint/ when started again with the
same params, tokenizer and data. Runs unchanged under `accelerate launch`.
"""
from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from chatforge.console import log, run_stage
from chatforge.errors import ChatforgeError
from chatforge.modeling import ModelConfig, build_model, count_parameters, load_initial_model, save_model
from chatforge.stats import bits_per_byte
from chatforge.ngram import KneserNeyLM
from chatforge.params import load_params, section
from chatforge.pretrained import is_scratch
from chatforge.provenance import write_report
from chatforge.token_shards import MANIFEST, TOKENS_DIR, check_tokenizer, open_splits
from chatforge.tokenization import load_tokenizer
from chatforge.training.pretrain import (
    STAGE, PretrainConfig, fingerprint, mark_complete, pretrain, resumable_checkpoint,
)
from chatforge.runtime import seed_everything, set_threads

TOKENIZER_DIR = Path("models/tokenizer")
OUTPUT_DIR = Path("models/base")
INIT_DIR = Path("models/init")
CHECKPOINT_DIR = Path("models/base_checkpoint")
REPORT = Path("reports/pretrain.json")
LIVE_DIR = "reports/live/pretrain"


def main() -> None:
    from accelerate import PartialState
    from dvclive import Live

    start = time.perf_counter()
    params = load_params()
    model_config = section(ModelConfig, "model", params)
    config = section(PretrainConfig, "pretrain", params)
    if is_scratch(model_config.init) and config.max_steps == 0:
        raise ChatforgeError("params.yaml: pretrain.max_steps=0 leaves a model.init=scratch model untrained; "
                             "set it to at least 1, or start from a pretrained model.init")
    set_threads(config.threads)
    seed_everything(config.seed)
    is_main = PartialState().is_main_process

    tokenizer = load_tokenizer(TOKENIZER_DIR)
    manifest, train_stream, val_stream = open_splits(TOKENS_DIR)
    check_tokenizer(manifest, TOKENIZER_DIR / "tokenizer.json", TOKENS_DIR)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    val_bytes = val["bytes"]
    log(STAGE, f"read {TOKENS_DIR}/: {train['texts']:,} train texts ({len(train_stream):,} tokens) and "
               f"{val['texts']:,} val texts ({len(val_stream):,} tokens, {val_bytes:,} bytes)")

    if is_scratch(model_config.init):
        model = build_model(model_config, tokenizer, config.seed)
    else:
        model = load_initial_model(model_config, tokenizer)
    if is_main:  # the start as the pipeline sees it (our tokenizer, its embeddings), evaluated as `init`
        save_model(INIT_DIR, model, tokenizer)
    parameters = count_parameters(model)
    shape = model.config
    log(STAGE, f"model ({model_config.init}): {shape.num_hidden_layers} layers, width {shape.hidden_size}, "
               f"{shape.num_attention_heads} heads, MLP {shape.intermediate_size}, "
               f"training context {model_config.context_length}: {parameters / 1e6:.2f}M parameters")

    # The manifest names the tokenizer's hash and every part's sha256: it stands for the data.
    run_fingerprint = fingerprint(dataclasses.asdict(model_config), dataclasses.asdict(config),
                                  (TOKENS_DIR / MANIFEST).read_bytes())
    resume_from = resumable_checkpoint(CHECKPOINT_DIR, run_fingerprint)
    live = Live(dir=LIVE_DIR, resume=resume_from is not None, dvcyaml=False, save_dvc_exp=False) if is_main else None
    result = pretrain(model, tokenizer, train_stream, val_stream, config, model_config.context_length,
                      CHECKPOINT_DIR, run_fingerprint, resume_from=resume_from, live=live)
    if live is not None:
        live.end()
    if not is_main:
        return

    ngram_start = time.perf_counter()
    ngram = KneserNeyLM(config.ngram_order, len(tokenizer), tokenizer.eos_token_id, config.ngram_discount)
    ngram.fit(train_stream.records())
    ngram_nats = sum(ngram.record_nats(tokens)[0] for tokens in val_stream.records())
    ngram_bpb = bits_per_byte(ngram_nats, val_bytes)
    ngram_seconds = time.perf_counter() - ngram_start

    save_model(OUTPUT_DIR, result.model, tokenizer)
    mark_complete(CHECKPOINT_DIR, {"step": config.max_steps, "fingerprint": run_fingerprint})

    val_loss = result.val_nats / result.val_tokens
    val_bpb = bits_per_byte(result.val_nats, val_bytes)
    log(STAGE, f"val loss {val_loss:.4f}, {val_bpb:.4f} bits/byte; "
               f"{config.ngram_order}-gram Kneser-Ney baseline {ngram_bpb:.4f} bits/byte ({ngram_seconds:.1f}s)")
    write_report(REPORT, {
        "val_loss": round(val_loss, 4),
        "val_perplexity": round(math.exp(val_loss), 3),
        "val_bits_per_byte": round(val_bpb, 4),
        "ngram_val_bits_per_byte": round(ngram_bpb, 4),
        "beats_ngram": val_bpb < ngram_bpb,
        "ngram_order": config.ngram_order,
        "ngram_seconds": round(ngram_seconds, 2),
        "final_train_loss": round(result.last_train_loss, 4),
        "tokens_seen": result.tokens_seen,
        "tokens_per_second": round(result.tokens_per_second, 1),
        "parameters": parameters,
        "init": model_config.init,
        "train_seconds": round(result.train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "resumed_from_step": result.resumed_from_step,
        "train_tokens": len(train_stream),
        "val_tokens": result.val_tokens,
        "val_bytes": val_bytes,
    })
    log(STAGE, f"wrote {INIT_DIR}/ (the start), {OUTPUT_DIR}/, {REPORT}, {LIVE_DIR}/")


main = run_stage(main)

if __name__ == "__main__":
    main()
