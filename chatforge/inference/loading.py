"""Models loaded for inference (chat, serve, evaluate, sampling for preferences and labels)."""
from __future__ import annotations

from pathlib import Path

from chatforge.errors import ChatforgeError
from chatforge.runtime import default_device
from chatforge.tokenization import load_tokenizer


def load_model(path: str | Path, stage_hint: str = "sft"):
    """(model, tokenizer) from a self-contained model dir, on the inference device; missing or half-built → one
    ChatforgeError line."""
    path = Path(path)
    fix = f"run `dvc repro {stage_hint}`"
    if not path.is_dir():
        raise ChatforgeError(f"{path}: no such model directory; {fix}")
    has_weights = (path / "model.safetensors").exists() or (path / "model.safetensors.index.json").exists()
    if not (path / "config.json").exists() or not has_weights:
        raise ChatforgeError(f"{path}: no model weights (config.json/model.safetensors missing); {fix}")
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise in chat and stages
    try:
        tokenizer = load_tokenizer(path, stage_hint=stage_hint)
        model = AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, SafetensorError) as error:  # truncated weights, bad config.json
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ChatforgeError(f"{path}: cannot load the model ({first_line}); {fix}") from None
    return model.eval().to(default_device()), tokenizer
