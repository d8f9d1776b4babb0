"""From messages to a prompt: the chat template's token ids (assistant prefill included), the prefix every prompt
shares, a history fitted to the model's context, the budget left for the prompt, and the ids that end a reply."""
from __future__ import annotations

from chatforge.errors import ChatforgeError
from chatforge.inference.sampling import SamplingParams
from chatforge.tokenization import end_of_turn_id


def context_length(model) -> int:
    return int(model.config.max_position_embeddings)


def prompt_budget(model, sampling: SamplingParams) -> int:
    """How many prompt tokens leave room for `max_new_tokens` in the model's context."""
    return max(1, context_length(model) - sampling.max_new_tokens)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` rendered with the chat template plus the assistant generation prompt; when the last
    message is the assistant's, its turn is left open instead, so generation continues it (assistant prefill).
    A template that cannot render the conversation raises ValueError or jinja2's TemplateError."""
    continues = messages[-1]["role"] == "assistant"
    ids = tokenizer.apply_chat_template(
        [{"role": m["role"], "content": m["content"]} for m in messages],
        add_generation_prompt=not continues,
        continue_final_message=continues,
        tokenize=True,
        return_dict=False,
    )
    if hasattr(ids, "keys"):  # some tokenizer versions return a BatchEncoding regardless
        ids = ids["input_ids"]
    return list(ids)


def shared_prompt_prefix(tokenizer) -> list[int]:
    """The ids every one-question prompt starts with: what the template writes before the user's words (a
    default system prompt, the user header). Two different questions rendered agree on exactly that much."""
    first, second = (prompt_ids(tokenizer, [{"role": "user", "content": text}]) for text in ("a", "Z9"))
    shared = next((i for i, (x, y) in enumerate(zip(first, second)) if x != y), min(len(first), len(second)))
    return first[:shared]


def fit_history(tokenizer, messages: list[dict], max_prompt_tokens: int) -> tuple[list[dict], int]:
    """Drop the oldest non-system turns until the prompt fits; returns (messages kept, turns dropped).

    Turns go a whole exchange at a time (a user turn and the replies after it), so the kept history still
    starts with a user turn. The system prompt and the last user turn are always kept; if those alone
    don't fit, that's a ChatforgeError (the message itself is too long).
    """
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    dropped = 0
    while len(prompt_ids(tokenizer, system + turns)) > max_prompt_tokens:
        if len(turns) <= 1:
            size = len(prompt_ids(tokenizer, system + turns))
            raise ChatforgeError(
                f"the message is too long: {size} prompt tokens, the model has room for {max_prompt_tokens}; "
                "send a shorter message (or a shorter --system prompt)"
            )
        next_user = next((i for i in range(1, len(turns)) if turns[i]["role"] == "user"), len(turns) - 1)
        dropped += next_user
        turns = turns[next_user:]
    return system + turns, dropped


def stop_ids(tokenizer) -> list[int]:
    ids = {end_of_turn_id(tokenizer)}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
