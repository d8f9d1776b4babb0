"""evaluate: the KL to the SFT model along a model's own replies."""
from __future__ import annotations

import torch

from chatforge.evaluation.evaluate import kl_along_replies
from chatforge.inference.generate import Reply
from chatforge.inference.prompting import prompt_ids
from conftest import make_tiny_llama


def test_kl_along_replies_is_zero_to_itself_and_the_exact_sum_otherwise(tiny_tokenizer):
    model, other = make_tiny_llama(tiny_tokenizer, seed=0), make_tiny_llama(tiny_tokenizer, seed=1)
    conversations = [[{"role": "user", "content": "Hello! How are you today?"}],
                     [{"role": "user", "content": "What is your favorite food? I like pizza."}]]
    replies = [Reply("", [20, 21, 22], True), Reply("", [23], False)]
    assert kl_along_replies(model, model, tiny_tokenizer, conversations, replies, batch_size=2) == 0.0

    expected = []
    with torch.no_grad():
        for messages, reply in zip(conversations, replies):
            prompt = prompt_ids(tiny_tokenizer, messages)
            ids = torch.tensor([prompt + reply.token_ids])
            log_p, log_q = (m(ids).logits[0].log_softmax(-1) for m in (model, other))
            positions = range(len(prompt) - 1, len(prompt) + len(reply.token_ids) - 1)
            expected.append(sum(float((log_p[t].exp() * (log_p[t] - log_q[t])).sum()) for t in positions))
    measured = kl_along_replies(model, other, tiny_tokenizer, conversations, replies, batch_size=2)
    assert measured > 0 and abs(measured - sum(expected) / 2) < 1e-4
