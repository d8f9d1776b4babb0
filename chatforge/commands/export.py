"""`chatforge export models/sft`: the model as GGUF files for llama.cpp, Ollama and LM Studio (docs/export.md).

Writes `<out>/<name>-<type>.gguf` and an Ollama `<name>-<type>.Modelfile` beside each; `--check` loads every file
back through transformers' GGUF loader (as `model.init` does) and prints how far its logits are from the model's.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from chatforge.export import DEFAULT_TYPES, TYPES

    parser.add_argument("model", type=Path, help="a saved model folder (models/sft, models/dpo, ...)")
    parser.add_argument("--out", type=Path, help="output folder (default: exports/<model folder name>)")
    parser.add_argument("--types", default=DEFAULT_TYPES,
                        help=f"comma-separated GGUF types among {', '.join(TYPES)} (default: {DEFAULT_TYPES})")
    parser.add_argument("--check", action="store_true",
                        help="load each file back and compare its logits with the model's")


def run(args: argparse.Namespace) -> None:
    from chatforge.console import log
    from chatforge.export import export, load_source, parse_types, round_trip

    types = parse_types(args.types)
    out = args.out or Path("exports") / args.model.resolve().name
    model, tokenizer = load_source(args.model)
    written = export(model, tokenizer, args.model, out, types)
    if args.check:
        for done in written:
            check = round_trip(model, tokenizer, done.path)
            tokenizer_state = "identical" if check.same_token_ids else "DIFFERENT"
            log("export", f"{done.path.name}: logits max |Δ| {check.max_abs_logit_diff} (mean "
                          f"{check.mean_abs_logit_diff}) over {check.positions} positions, same next token at "
                          f"{check.argmax_agreement:.1%}, token ids {tokenizer_state}")
