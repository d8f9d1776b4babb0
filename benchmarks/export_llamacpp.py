"""An exported GGUF in llama.cpp (llama-cpp-python) beside chatforge's own generation, in one run.

    python benchmarks/export_llamacpp.py models/sft [--types f16,q8_0] [--new-tokens 64] [--decode-tokens 128]

The model is exported into a temporary folder; for each type llama.cpp loads the file, and the same chat prompts
are answered greedily (no repetition penalty) by llama.cpp and by chatforge's loop (`chatforge.inference`, the
decoding that `chatforge serve` batches; here fp32 at batch 1). Reported per type:
- llama.cpp's own tokenizer on the chat-rendered prompts against ours (the file's vocabulary, merges and
  pre-tokenizer at work);
- chat replies (ending at the end-of-turn token or `--new-tokens`): how many are token for token the same, and
  where the first difference is otherwise;
- `create_chat_completion`: llama-cpp-python renders the file's chat template with its own Jinja and stops at
  the file's end-of-generation tokens; its reply text against ours;
- decode speed: `--decode-tokens` tokens past each prompt, the stop token ignored, tokens/s of each and the ratio.
Both use `--threads` threads. Without llama-cpp-python (it compiles llama.cpp; not a chatforge dependency) the
script says so and exits 0.

Figures: docs/export.md, "Measured".
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatforge.export import export, load_source, parse_types  # noqa: E402
from chatforge.inference.generate import generate_from_ids, sample_tokens  # noqa: E402
from chatforge.inference.prompting import stop_ids  # noqa: E402
from chatforge.inference.sampling import SamplingParams  # noqa: E402
from chatforge.tokenization import chat_text  # noqa: E402
from chatforge.runtime import set_threads  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "How do I boil an egg?",
           "Give me three tips for learning Python.", "Hi! Who are you?"]


def llama_cpp_greedy(llm, prompt: list[int], stops: list[int], new_tokens: int) -> list[int]:
    """Greedy token ids after `prompt`, up to and including a stop token (as ours), at most `new_tokens`."""
    reply = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        reply.append(token)
        if token in stops or len(reply) == new_tokens:
            break
    return reply


def our_greedy(model, prompt: list[int], sampling: SamplingParams, pad_id: int) -> list[int]:
    """`sampling.max_new_tokens` greedy tokens after `prompt`, the stop token ignored."""
    return [int(step[0]) for step in sample_tokens(model, [prompt], sampling, stop=[], pad_id=pad_id,
                                                   ignore_stop=True)]


def tokens_per_second(decode, prompts: list[list[int]]) -> tuple[float, list[list[int]]]:
    started, outputs = time.perf_counter(), [decode(prompt) for prompt in prompts]
    return sum(map(len, outputs)) / (time.perf_counter() - started), outputs


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a saved model folder")
    parser.add_argument("--types", default="f16,q8_0")
    parser.add_argument("--new-tokens", type=int, default=64, help="at most this many tokens a chat reply")
    parser.add_argument("--decode-tokens", type=int, default=128, help="tokens per prompt for the speed measure")
    parser.add_argument("--threads", type=int, default=1, help="threads for both (torch and llama.cpp)")
    args = parser.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError as error:
        print(f"skipped: llama-cpp-python is not installed ({error}); `pip install llama-cpp-python` compiles it")
        return
    set_threads(args.threads)
    model, tokenizer = load_source(args.model)
    conversations = [[{"role": "user", "content": prompt}] for prompt in PROMPTS]
    texts = [chat_text(tokenizer, conversation, generation_prompt=True) for conversation in conversations]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    stops = stop_ids(tokenizer)
    greedy = SamplingParams(temperature=0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                            max_new_tokens=args.new_tokens)

    ours = [generate_from_ids(model, tokenizer, [prompt], greedy)[0] for prompt in prompts]
    context = model.config.max_position_embeddings
    decode_tokens = min(args.decode_tokens, context - max(map(len, prompts)))  # a small model's context caps it
    fixed = dataclasses.replace(greedy, max_new_tokens=decode_tokens)
    our_speed, our_decodes = tokens_per_second(lambda p: our_greedy(model, p, fixed, tokenizer.pad_token_id), prompts)
    print(f"{args.model}: {len(prompts)} chat prompts, greedy, {args.threads} thread(s); chatforge (fp32, batch 1) "
          f"decodes {our_speed:.1f} tokens/s")

    with tempfile.TemporaryDirectory() as out:
        for written in export(model, tokenizer, args.model, Path(out), parse_types(args.types)):
            llm = Llama(model_path=str(written.path), n_ctx=min(2048, context),
                        n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
            their_prompts = [llm.tokenize(text.encode("utf-8"), add_bos=False, special=True) for text in texts]
            same_prompts = sum(theirs == mine for theirs, mine in zip(their_prompts, prompts))
            replies = [llama_cpp_greedy(llm, prompt, stops, args.new_tokens) for prompt in prompts]
            differences = [first_difference(theirs, reply.token_ids) for theirs, reply in zip(replies, ours)]
            chat = [llm.create_chat_completion(messages=conversation, temperature=0.0, top_k=1, repeat_penalty=1.0,
                                               max_tokens=args.new_tokens)["choices"][0]["message"]["content"]
                    for conversation in conversations]
            same_chat = sum(text.strip() == reply.text.strip() for text, reply in zip(chat, ours))
            speed, decodes = tokens_per_second(lambda p: llama_cpp_greedy(llm, p, [], decode_tokens), prompts)
            decode_differences = [first_difference(a, b) for a, b in zip(decodes, our_decodes)]
            print(f"llama.cpp {written.type} ({written.bytes / 1e6:.1f} MB): tokenizer same on {same_prompts}/"
                  f"{len(prompts)} prompts; chat replies same on {differences.count(None)}/{len(prompts)} (first "
                  f"difference at {differences}); create_chat_completion text same on {same_chat}/{len(prompts)}; "
                  f"{decode_tokens}-token decodes same on {decode_differences.count(None)}/{len(prompts)} "
                  f"(first difference at {decode_differences}); {speed:.1f} tokens/s = {speed / our_speed:.2f}x "
                  f"chatforge")
            for text, reply in zip(chat[:2], ours[:2]):
                print(f"    llama.cpp: {text[:100]!r}\n    chatforge: {reply.text[:100]!r}")
            llm.close()


if __name__ == "__main__":
    main()
