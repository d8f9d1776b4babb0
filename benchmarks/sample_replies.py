"""Replies of several models to the same fixed held-out prompts, side by side, as a markdown table.

The prompts are the opening user turns of test conversations chosen by a stable hash of their id
(corpus.fixed_sample), so two runs of the pipeline (scratch and pretrained) answer the same questions.

    python benchmarks/sample_replies.py models/base models/sft models/ppo [--prompts 10] [--temperature 0]
    python benchmarks/sample_replies.py scratch=models/sft smollm2=/path/to/exp/models/sft

Listed in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatforge.corpus import fixed_sample  # noqa: E402
from chatforge.files import read_jsonl  # noqa: E402
from chatforge.inference.generate import generate_replies  # noqa: E402
from chatforge.inference.loading import load_model  # noqa: E402
from chatforge.inference.sampling import default_sampling, SamplingParams  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="model folders, optionally named: name=path")
    parser.add_argument("--test", type=Path, default=Path("data/clean/test.jsonl"))
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default), else generate params")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    conversations = [c for c in read_jsonl(args.test) if c["turns"] and c["turns"][0]["role"] == "user"]
    prompts = [[c["turns"][0]] for c in fixed_sample(conversations, args.prompts)]
    sampling: SamplingParams = default_sampling().updated(
        {"temperature": args.temperature, "max_new_tokens": args.max_new_tokens})
    columns = {}
    for spec in args.models:
        name, _, path = spec.rpartition("=")
        model, tokenizer = load_model(path, stage_hint=Path(path).name)
        start = time.perf_counter()
        replies = generate_replies(model, tokenizer, prompts, sampling, seed=0, batch_size=len(prompts))
        tokens = sum(len(reply.token_ids) for reply in replies)
        print(f"{name or path}: {tokens} tokens in {time.perf_counter() - start:.1f}s", file=sys.stderr)
        columns[name or path] = [reply.text.replace("\n", " ").replace("|", "\\|") for reply in replies]

    print("| prompt | " + " | ".join(columns) + " |")
    print("|" + " --- |" * (len(columns) + 1))
    for row, prompt in enumerate(prompts):
        cells = [prompt[0]["content"].replace("|", "\\|")] + [replies[row] for replies in columns.values()]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
