"""Loading a reward model and scoring conversations with it (used by reward, ppo, evaluate).

A reward model is an `AutoModelForSequenceClassification` with one label, saved with its tokenizer. A
conversation is rendered with the chat template exactly as in training; the model pools at the last
non-pad token, which closes the last reply (`<|end|>` in our format; pad is distinct from every end token).
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

from chatforge.errors import ChatforgeError
from chatforge.modeling import training_window
from chatforge.runtime import default_device
from chatforge.tokenization import load_tokenizer, preamble_ids


def load_reward_classifier(path: str | Path, stage_hint: str = "reward", dtype: torch.dtype | None = None):
    """The saved one-label `AutoModelForSequenceClassification`, as saved (train mode, on the CPU; `dtype`: the
    weights' dtype, default transformers'); a missing or half-built dir is one clear line. Every reward model is
    loaded here: for scoring (`load_reward_model`) and for RL (`training.rl.load_reward_and_critic`)."""
    path = Path(path)
    if not (path / "config.json").exists() or not any(path.glob("*.safetensors")):
        raise ChatforgeError(f"{path}: no reward model (config.json + safetensors); run `dvc repro {stage_hint}` first")
    model = AutoModelForSequenceClassification.from_pretrained(
        str(path), use_safetensors=True, **({"dtype": dtype} if dtype is not None else {}))
    if model.config.num_labels != 1:
        raise ChatforgeError(f"{path}: num_labels={model.config.num_labels}, a reward model has 1; rebuild it")
    return model


def load_reward_model(path: str | Path, stage_hint: str = "reward"):
    """(model, tokenizer) of a saved reward model, in eval mode on `default_device()`."""
    tokenizer = load_tokenizer(path, stage_hint)
    model = load_reward_classifier(path, stage_hint)
    return model.eval().to(default_device()), tokenizer


def encode_conversation(tokenizer, turns: list[dict], max_length: int) -> list[int]:
    """Token ids of a rendered conversation. Too long: keep the template's preamble (our `<|bos|>`) and the
    last tokens, because the reward is read at the end of the last reply, which must stay whole."""
    ids = tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True)["input_ids"]
    if len(ids) > max_length:
        keep = len(preamble_ids(tokenizer))
        ids = ids[:keep] + ids[len(ids) - (max_length - keep):]
    return ids


def max_length_of(model, requested: int | None = None) -> int:
    if not requested:
        return training_window(model)
    return min(requested, int(model.config.max_position_embeddings))


@torch.no_grad()
def score_conversations(model, tokenizer, conversations: list[list[dict]], batch_size: int = 16,
                        max_length: int | None = None) -> list[float]:
    """One scalar reward per conversation (a list of turns ending in the assistant reply to score)."""
    max_length = max_length_of(model, max_length)
    encoded = [encode_conversation(tokenizer, turns, max_length) for turns in conversations]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))  # similar lengths batch together
    device = next(model.parameters()).device
    scores = [0.0] * len(encoded)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), batch_size):
        batch = [encoded[i] for i in order[start:start + batch_size]]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
        for index, value in zip(order[start:start + batch_size], logits[:, 0].float().tolist()):
            scores[index] = value
    model.train(was_training)
    return scores
