"""GGUF export of saved models: time and size per type, and the logit difference after the round trip.

    python benchmarks/export_gguf.py models/sft [more model folders] [--types f16,q8_0] [--threads 1]

For each model, `chatforge.export.export` writes every type into a temporary folder; each file is then loaded
back through transformers' GGUF loader (as `model.init` reads it, de-quantized to fp32) and its logits compared
with the source model's on `export.ROUND_TRIP_PROBES` (chat-rendered conversations). Sizes are also given as a
ratio of the model's safetensors weights, the baseline in the same run.

Figures: docs/export.md, "Measured".
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatforge.export import DEFAULT_TYPES, export, load_source, parse_types, round_trip  # noqa: E402
from chatforge.modeling import count_parameters  # noqa: E402
from chatforge.runtime import set_threads  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", type=Path, help="saved model folders")
    parser.add_argument("--types", default=DEFAULT_TYPES)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = one per core)")
    args = parser.parse_args()
    set_threads(args.threads)
    types = parse_types(args.types)

    print("| model | params | type | export s | MB | × safetensors | load-back s | max abs Δlogit | mean abs Δlogit "
          "| same next token | same token ids |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for folder in args.models:
        model, tokenizer = load_source(folder)
        safetensors_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        with tempfile.TemporaryDirectory() as out:
            for written in export(model, tokenizer, folder, Path(out), types):
                started = time.perf_counter()
                check = round_trip(model, tokenizer, written.path)
                load_seconds = time.perf_counter() - started
                print(f"| {folder} | {count_parameters(model) / 1e6:.1f}M | {written.type} | {written.seconds:.1f} "
                      f"| {written.bytes / 1e6:.1f} | {written.bytes / safetensors_bytes:.2f} | {load_seconds:.1f} "
                      f"| {check.max_abs_logit_diff:.4f} | {check.mean_abs_logit_diff:.4f} "
                      f"| {check.argmax_agreement:.1%} of {check.positions} | {check.same_token_ids} |", flush=True)


if __name__ == "__main__":
    main()
