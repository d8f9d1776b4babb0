"""Evaluate one model on the test split: language-model metrics and sampled replies.

- all tokens: the test text packed exactly as pretraining packs it (end-of-text between records), so the
  numbers compare across base/sft/ppo and with the Kneser-Ney n-gram baseline scored on the same tokens;
- assistant tokens: the test conversations rendered with the chat template, loss on assistant tokens only;
- replies: a fixed set of held-out prompts answered with the `generate` params and one seed, scored by the
  reward model, with distinct-1/2, mean length, the share of replies that ended their turn, and the KL to the
  SFT model along those replies (`kl_to_sft`, below).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from chatforge.chat_windows import fit_conversations
from chatforge.conversation import stable_hash
from chatforge.inference.generate import generate_replies
from chatforge.inference.prompting import prompt_ids
from chatforge.inference.sampling import SamplingParams
from chatforge.lm_loss import assistant_loss, evaluate_nats, pack
from chatforge.logprobs import row_logits, scored_rows
from chatforge.modeling import training_window
from chatforge.ngram import KneserNeyLM
from chatforge.params import require
from chatforge.prompts import build_prompts, heldout_prompts
from chatforge.reward_model import score_conversations
from chatforge.stats import bits_per_byte, distinct_n


@dataclass
class EvaluateConfig:
    """params.yaml `evaluate`."""

    num_prompts: int = 48
    max_test_records: int | None = None  # LM metrics on a fixed sample of test conversations (and documents); None: all
    seed: int = 0
    batch_size: int = 16
    max_new_tokens: int | None = None  # None: generate.max_new_tokens
    ngram_order: int = 3
    ngram_discount: float = 0.75
    precision: str = "auto"
    threads: int = 0

    def validate(self, section: str) -> None:
        require(self.num_prompts > 0, f"{section}.num_prompts", "must be positive")
        require(self.max_test_records is None or self.max_test_records > 0, f"{section}.max_test_records",
                "must be positive or null (all)")
        require(self.batch_size > 0, f"{section}.batch_size", "must be positive")
        require(self.ngram_order >= 2, f"{section}.ngram_order", "must be at least 2")
        require(self.precision in ("auto", "bf16", "fp32"), f"{section}.precision", "must be auto, bf16 or fp32")


def all_token_metrics(model, tokenizer, test_texts: list[str], batch_size: int, device, dtype) -> dict:
    tokens = tokenizer(test_texts, add_special_tokens=False)["input_ids"]
    stream = pack(tokens, tokenizer.eos_token_id)
    nats, count = evaluate_nats(model, stream, training_window(model), batch_size, device, dtype)
    text_bytes = sum(len(text.encode("utf-8")) for text in test_texts)
    loss = nats / count
    return {"loss": loss, "perplexity": float(torch.tensor(loss).exp()), "bits_per_byte": bits_per_byte(nats, text_bytes),
            "tokens": count, "bytes": text_bytes}


def ngram_metrics(tokenizer, train_texts: list[str], test_texts: list[str], order: int, discount: float) -> dict:
    """The n-gram baseline on the same test tokens and bytes as `all_token_metrics`."""
    encode = lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]  # noqa: E731
    lm = KneserNeyLM(order, len(tokenizer), tokenizer.eos_token_id, discount).fit(encode(train_texts))
    nats, count = 0.0, 0
    for tokens in encode(test_texts):
        record_nats, symbols = lm.record_nats(tokens)
        nats, count = nats + record_nats, count + symbols
    text_bytes = sum(len(text.encode("utf-8")) for text in test_texts)
    return {"order": order, "bits_per_byte": bits_per_byte(nats, text_bytes), "perplexity": float(torch.tensor(nats / count).exp())}


def assistant_metrics(model, tokenizer, test_conversations: list[dict], batch_size: int, dtype) -> dict:
    windows, stats = fit_conversations(tokenizer, test_conversations, training_window(model),
                                       desc="assistant tokens")
    result = assistant_loss(model, tokenizer, windows, batch_size=batch_size, dtype=dtype).as_dict()
    result["assistant_tokens_cut"] = stats.assistant_tokens_cut
    return result


def fixed_prompts(tokenizer, test_conversations: list[dict], config: EvaluateConfig, sampling: SamplingParams,
                  context: int) -> list[dict]:
    """The same held-out prompts for every model: user turns with their history, fitting the context."""
    counts: dict = {}
    prompts = build_prompts(test_conversations, tokenizer, context - sampling.max_new_tokens, counts)
    prompts.sort(key=lambda p: json.dumps(p["messages"], sort_keys=True))  # independent of file order
    return heldout_prompts(prompts, config.num_prompts, config.seed)


@torch.no_grad()
def kl_along_replies(model, reference, tokenizer, conversations: list[list[dict]], replies: list,
                     batch_size: int) -> float:
    """Nats per reply: at each token of the model's reply, the exact KL(model ‖ reference) of the two next-token
    distributions (temperature 1), summed over the reply and averaged over replies. Exact per position, so no
    sampling noise beyond the replies themselves; with pure sampling its mean is the sequence-level KL that PPO
    and DPO report, and under the `generate` params it measures how far the model moved along what it says."""
    device = next(model.parameters()).device
    rows = [(prompt_ids(tokenizer, messages), list(reply.token_ids)) for messages, reply in zip(conversations, replies)]
    totals = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(prompt) + len(reply) for prompt, reply in batch)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask, scored = torch.zeros_like(ids), torch.zeros(len(batch), width, dtype=torch.bool)
        for row, (prompt, reply) in enumerate(batch):
            ids[row, :len(prompt) + len(reply)] = torch.tensor(prompt + reply)
            mask[row, :len(prompt) + len(reply)] = 1
            scored[row, len(prompt) - 1:len(prompt) + len(reply) - 1] = True  # positions that predict a reply token
        ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
        rows_p, head_p, vocab = scored_rows(model, ids, mask, scored)
        rows_q, head_q, _ = scored_rows(reference, ids, mask, scored)
        reply_of_row, kl = scored.nonzero()[:, 0], torch.zeros(len(batch), device=device)
        for chunk, logits_p in row_logits(rows_p, head_p, vocab):  # fp32, as generation runs; a chunk at a time
            log_p, log_q = logits_p.float().log_softmax(-1), head_q(rows_q[chunk]).float().log_softmax(-1)
            kl.index_add_(0, reply_of_row[chunk], (log_p.exp() * (log_p - log_q)).sum(-1))
        totals += kl.tolist()
    return sum(totals) / len(totals)


def reply_metrics(model, tokenizer, reward, prompts: list[dict], sampling: SamplingParams, config: EvaluateConfig,
                  sft=None):
    """(summary, samples) of the model's replies to `prompts`, scored by the reward model (model, tokenizer);
    `sft`: the SFT model to measure the KL to (None: this is the SFT model, KL 0)."""
    conversations = [p["messages"] for p in prompts]
    replies = generate_replies(model, tokenizer, conversations, sampling, seed=config.seed,
                               batch_size=config.batch_size)
    reward_model, reward_tokenizer = reward
    scored = [messages + [{"role": "assistant", "content": r.text}] for messages, r in zip(conversations, replies)]
    scores = score_conversations(reward_model, reward_tokenizer, scored, batch_size=config.batch_size)
    texts = [r.text for r in replies]
    summary = {
        "prompts": len(prompts),
        "reward_mean": sum(scores) / len(scores),
        "reward_std": float(torch.tensor(scores).std()) if len(scores) > 1 else 0.0,
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "mean_length": sum(len(r.token_ids) for r in replies) / len(replies),
        "end_of_turn_rate": sum(r.ended for r in replies) / len(replies),
        "kl_to_sft": 0.0 if sft is None else kl_along_replies(model, sft, tokenizer, conversations, replies,
                                                              config.batch_size),
    }
    samples = [
        {"id": f"{stable_hash(json.dumps(messages, sort_keys=True)):016x}", "prompt": messages, "reply": r.text,
         "ended": r.ended, "tokens": len(r.token_ids), "score": score}
        for messages, r, score in zip(conversations, replies, scores)
    ]
    return summary, samples
