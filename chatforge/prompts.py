"""Prompts for sampling from a policy: every user turn of a conversation with its history, fitted to a token
budget (ppo's rollouts and held-out comparison, dpo's held-out comparison, evaluate's samples)."""
from __future__ import annotations

import random

from chatforge.errors import ChatforgeError
from chatforge.inference.prompting import fit_history, prompt_ids


def build_prompts(conversations: list[dict], tokenizer, max_prompt_tokens: int, counts: dict) -> list[dict]:
    """Every user turn with the history before it, rendered with the generation prompt.

    A prompt longer than `max_prompt_tokens` loses its oldest exchanges (`prompting.fit_history`, as the
    chat does); one whose last user turn alone is too long is skipped. Identical prompts are kept once.
    `counts` gets the tally by outcome. Returns [{"messages", "ids"}].
    """
    seen, prompts = set(), []
    for record in conversations:
        turns = record.get("turns", [])
        for end, turn in enumerate(turns):
            if turn.get("role") != "user":
                continue
            try:
                messages, dropped = fit_history(tokenizer, turns[: end + 1], max_prompt_tokens)
            except ChatforgeError:
                counts["skipped_too_long"] = counts.get("skipped_too_long", 0) + 1
                continue
            ids = prompt_ids(tokenizer, messages)
            if tuple(ids) in seen:
                counts["duplicate"] = counts.get("duplicate", 0) + 1
                continue
            seen.add(tuple(ids))
            counts["shortened"] = counts.get("shortened", 0) + int(dropped > 0)
            prompts.append({"messages": messages, "ids": ids})
    counts["prompts"] = len(prompts)
    return prompts


def heldout_prompts(prompts: list[dict], count: int, seed: int) -> list[dict]:
    chosen = list(prompts)
    random.Random(seed).shuffle(chosen)
    return chosen[:count]
