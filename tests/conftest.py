"""Shared fixtures: a tiny tokenizer and tiny random Llama models, built in seconds, never downloaded."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Stages (dvc.yaml's `python`) and pr-report (`dvc`) call tools by name: make them this interpreter's,
# whether or not its virtual environment is activated.
os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])

SHARED_CORPORA = Path(__file__).resolve().parents[2] / "shared" / "corpora"

TINY_TEXTS = [
    "Hello! How are you today?",
    "I am fine, thank you. And you?",
    "What is your favorite food? I like pizza and pasta.",
    "The weather is nice, let us go for a walk in the park.",
    "Can you tell me a joke? Why did the chicken cross the road?",
    "Computers run programs written by people in languages like Python.",
] * 20


def corpus_path(name: str) -> Path:
    """A file of ../shared/corpora, or skip the test when it is absent (as on a user's machine)."""
    path = SHARED_CORPORA / name
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared corpora are only on the project's machines")
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from chatforge.tokenization import train_tokenizer

    return train_tokenizer(TINY_TEXTS, vocab_size=300, min_frequency=2)


def make_tiny_llama(tokenizer, seed: int = 0, hidden: int = 32, layers: int = 2, context: int = 128,
                    kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=kv_heads,  # 1: grouped-query attention, as SmolLM2's
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def make_loud_llama(tokenizer, kv_heads: int = 2):
    """A tiny random Llama whose layers are loud enough that greedy replies vary and rarely end (at init they
    barely touch the residual stream, so with tied embeddings every reply repeats the last prompt token)."""
    model = make_tiny_llama(tokenizer, seed=0, kv_heads=kv_heads)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for weight in model.model.layers.parameters():
            if weight.dim() == 2:
                weight.normal_(0, 0.3, generator=generator)
    return model


def save_tiny_models(root: Path, tokenizer, names: list[str]) -> list:
    """One saved tiny random Llama per name (seeds 0, 1, …) under `root`, as the server's model specs."""
    from chatforge.serving.worker import ModelSpec

    for seed, name in enumerate(names):
        make_tiny_llama(tokenizer, seed=seed).save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    return [ModelSpec(name, root / name) for name in names]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny random causal LM with its tokenizer, loadable like any stage's model directory."""
    path = tmp_path_factory.mktemp("tiny_model")
    model = make_tiny_llama(tiny_tokenizer)
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


SMOLLM_TEMPLATE = (  # SmolLM2-Instruct's ChatML template, with its default system prompt
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def make_chatml_tokenizer(chat_template: str | None = SMOLLM_TEMPLATE):
    """A tiny byte-level BPE tokenizer shaped like SmolLM2's: ChatML specials, pad == eos == <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core.train_from_iterator(TINY_TEXTS, trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>", unk_token="<|endoftext|>",
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="session")
def pretrained_dir(tmp_path_factory):
    """A saved tiny 'pretrained' model in SmolLM2's shape (ChatML template, pad == eos), as model.init takes it."""
    path = tmp_path_factory.mktemp("pretrained")
    tokenizer = make_chatml_tokenizer()
    make_tiny_llama(tokenizer, seed=3, context=256).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
