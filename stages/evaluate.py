"""evaluate@<model>: perplexity and bits per byte on the test split (all tokens and assistant tokens),
the n-gram baseline on the same tokens, and replies to fixed held-out prompts scored by the reward model,
with their KL to the SFT model; beside them the model's IFEval figures (general ability, from ifeval@<model>).

Usage (dvc.yaml runs one per model): python stages/evaluate.py {init,base,sft,ppo,dpo}
"""
import json
from pathlib import Path

import torch

from chatforge.console import log, run_stage, stage_seconds
from chatforge.corpus import fixed_sample, read_texts, split_files, texts_of
from chatforge.evaluation import model_argument, wrote_init_as_base
from chatforge.evaluation.evaluate import (
    EvaluateConfig, all_token_metrics, assistant_metrics, fixed_prompts, ngram_metrics, reply_metrics,
)
from chatforge.files import read_jsonl, write_jsonl
from chatforge.inference.loading import load_model
from chatforge.inference.sampling import SamplingParams
from chatforge.modeling import training_window
from chatforge.params import load_params, section
from chatforge.pretrained import is_scratch
from chatforge.provenance import write_report
from chatforge.reward_model import load_reward_model
from chatforge.runtime import stage_precision, start_stage

REWARD_DIR = Path("models/reward")
SFT_DIR = Path("models/sft")
OUT_DIR = Path("reports/eval")
IFEVAL_DIR = Path("reports/ifeval")


@run_stage
def main() -> None:
    name = model_argument("evaluate")
    stage = f"evaluate@{name}"
    params = load_params()
    config = section(EvaluateConfig, "evaluate", params)
    sampling = section(SamplingParams, "generate", params)
    if config.max_new_tokens:
        sampling = sampling.updated({"max_new_tokens": config.max_new_tokens})
    if wrote_init_as_base("evaluate", name, params, OUT_DIR / f"{name}.json", OUT_DIR / f"{name}_samples.jsonl"):
        return
    start_stage(config.seed, config.threads)

    model, tokenizer = load_model(Path("models") / name, stage_hint="pretrain" if name == "init" else name)
    reward = load_reward_model(REWARD_DIR)
    device = next(model.parameters()).device
    dtype = stage_precision(stage, device, config.precision)
    conversations, documents = split_files("test")
    all_conversations = read_jsonl(conversations)
    test_conversations = fixed_sample(all_conversations, config.max_test_records)
    test_texts = list(texts_of(test_conversations, fixed_sample(read_jsonl(documents), config.max_test_records)))
    train_texts = read_texts("train")
    log(stage, f"read {len(all_conversations):,} test conversations; language-model metrics on "
               f"{len(test_conversations):,} of them ({len(test_texts):,} test texts)")

    with torch.no_grad():
        all_tokens = all_token_metrics(model, tokenizer, test_texts, config.batch_size, device, dtype)
        assistant = assistant_metrics(model, tokenizer, test_conversations, config.batch_size, dtype)
    ngram = ngram_metrics(tokenizer, train_texts, test_texts, config.ngram_order, config.ngram_discount)
    log(stage, f"all tokens: perplexity {all_tokens['perplexity']:.2f}, {all_tokens['bits_per_byte']:.3f} bits/byte "
               f"({config.ngram_order}-gram baseline {ngram['bits_per_byte']:.3f}); assistant tokens: perplexity "
               f"{assistant['perplexity']:.2f}, {assistant['bits_per_byte']:.3f} bits/byte")

    prompts = fixed_prompts(tokenizer, all_conversations, config, sampling, training_window(model))
    sft = None if name == "sft" else load_model(SFT_DIR, stage_hint="sft")[0].to(device)
    replies, samples = reply_metrics(model, tokenizer, reward, prompts, sampling, config, sft)
    log(stage, f"{replies['prompts']} held-out replies: reward {replies['reward_mean']:.3f}, distinct-2 "
               f"{replies['distinct_2']:.3f}, mean length {replies['mean_length']:.1f} tokens, "
               f"{replies['end_of_turn_rate']:.0%} ended their turn, KL to SFT {replies['kl_to_sft']:.2f} nats")

    write_jsonl(OUT_DIR / f"{name}_samples.jsonl", samples)
    start = {"scratch": is_scratch(params["model"]["init"])} if name == "init" else {}  # scratch: base is the reference
    write_report(OUT_DIR / f"{name}.json", {
        "model": name,
        **start,
        "all_tokens": all_tokens,
        "ngram": ngram,
        "assistant_tokens": assistant,
        "replies": replies,
        "ifeval": json.loads((IFEVAL_DIR / f"{name}.json").read_text())["ifeval"],
        "wall_seconds": stage_seconds(),
    })
    log(stage, f"wrote {OUT_DIR}/{name}.json and {name}_samples.jsonl")


if __name__ == "__main__":
    main()
