"""`chatforge export`: GGUF files that load back with the model's logits, tokenizer, chat template and stop tokens,
their Ollama Modelfiles, and one-line refusals that leave no file."""
from __future__ import annotations

import re
import numpy as np
import pytest
import torch
import yaml
from gguf import GGMLQuantizationType, GGUFReader, TokenType

from chatforge.cli import main
from chatforge.errors import ChatforgeError
from chatforge.export import check_exportable, export, load_source, parse_types, round_trip, write_gguf
from chatforge.modeling import ModelConfig, load_initial_model
from chatforge.modelfile import go_template, turn_format
from chatforge.pretrained import resolve
from chatforge.tokenization import adopt_tokenizer, end_of_turn_id
from conftest import make_chatml_tokenizer, make_loud_llama
from stage_projects import run_stage, write_clean_splits

CONVERSATION = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "How are you?"}]


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_tokenizer):
    """A saved tiny Llama with our tokenizer: grouped-query attention (k has fewer heads than q, so the two rope
    permutations differ) and loud layers (logits far from uniform, so a wrong permutation shows)."""
    path = tmp_path_factory.mktemp("tiny_sft")
    make_loud_llama(tiny_tokenizer, kv_heads=1).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory):
    model, tokenizer = load_source(model_dir)
    out = tmp_path_factory.mktemp("exports")
    return model, tokenizer, {w.type: w.path for w in export(model, tokenizer, model_dir, out, ["f32", "f16", "q8_0"])}


# q8_0 flips a few near-ties of this random model's next-token choice (a trained model's: docs/export.md)
@pytest.mark.parametrize("type_name, tolerance, agreement", [("f32", 0.0, 1.0), ("f16", 1e-2, 1.0),
                                                              ("q8_0", 5e-2, 0.9)])
def test_a_tiny_llama_loads_back_with_its_logits_and_tokenizer(exported, type_name, tolerance, agreement):
    model, tokenizer, paths = exported
    check = round_trip(model, tokenizer, paths[type_name])
    assert check.same_token_ids and check.positions > 50
    assert check.max_abs_logit_diff <= tolerance and check.argmax_agreement >= agreement, check


def test_the_chat_template_and_stop_tokens_read_back_from_the_file(exported):
    model, tokenizer, paths = exported
    reader = GGUFReader(paths["f16"])
    template = field(reader, "tokenizer.chat_template")
    assert "{% generation %}" not in template  # transformers' mask markers: other Jinja engines reject them
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False, chat_template=template) == \
        tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    end = end_of_turn_id(tokenizer)
    assert tokens[field(reader, "tokenizer.ggml.eot_token_id")] == "<|end|>" == tokenizer.convert_ids_to_tokens(end)
    assert tokens[field(reader, "tokenizer.ggml.eos_token_id")] == "<|eos|>"
    assert tokens[field(reader, "tokenizer.ggml.bos_token_id")] == "<|bos|>"
    assert tokens[field(reader, "tokenizer.ggml.padding_token_id")] == "<|pad|>"
    word = tokenizer("Hello", add_special_tokens=False)["input_ids"][0]
    assert types[end] == TokenType.CONTROL and types[word] == TokenType.NORMAL
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.add_bos_token") is False  # the template writes <|bos|> itself
    assert field(reader, "llama.context_length") == model.config.max_position_embeddings
    assert field(reader, "general.architecture") == "llama"


def test_q8_0_quantizes_the_matrices_and_keeps_the_norms_f32(exported):
    _, _, paths = exported
    types = {t.name: t.tensor_type for t in GGUFReader(paths["q8_0"]).tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == GGMLQuantizationType.F32
    assert "output.weight" not in types  # tied to the embedding
    assert paths["q8_0"].stat().st_size < 0.6 * paths["f16"].stat().st_size


def test_the_modelfile_names_the_file_the_template_and_the_stops(exported):
    _, _, paths = exported
    text = paths["q8_0"].with_suffix(".Modelfile").read_text()
    assert f"FROM ./{paths['q8_0'].name}\n" in text
    assert 'PARAMETER stop "<|end|>"\n' in text and 'PARAMETER stop "<|eos|>"\n' in text
    assert "PARAMETER num_ctx 128\n" in text
    assert '{{- else if eq .Role "user" }}{{ "<|user|>" }}{{ .Content }}{{ "<|end|>" }}\n' in text
    name = paths["f32"].name.rsplit("-", 1)[0]  # the model folder's
    assert sorted(p.name for p in paths["q8_0"].parent.iterdir()) == sorted(  # no temporary file left behind
        f"{name}-{t}{ext}" for t in ("f32", "f16", "q8_0") for ext in (".gguf", ".Modelfile"))


def test_a_chatml_template_with_a_default_system_prompt_becomes_a_go_template():
    tokenizer = make_chatml_tokenizer()
    turns = turn_format(tokenizer, tokenizer.chat_template, "chatml")
    assert turns.default_system == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    for messages in (CONVERSATION, [{"role": "system", "content": "Be brief."}, *CONVERSATION]):
        assert turns.render(messages, reply_prompt=True) == tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True)
    assert go_template(turns) == "\n".join([
        "{{- range $i, $_ := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        '{{- if and (eq $i 0) (ne .Role "system") }}'
        '{{ "<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n" }}{{ end }}',
        '{{- if eq .Role "system" }}{{ "<|im_start|>system\\n" }}{{ .Content }}{{ "<|im_end|>\\n" }}',
        '{{- else if eq .Role "user" }}{{ "<|im_start|>user\\n" }}{{ .Content }}{{ "<|im_end|>\\n" }}',
        '{{- else if eq .Role "assistant" }}{{ "<|im_start|>assistant\\n" }}{{ .Content }}'
        '{{ if not $last }}{{ "<|im_end|>\\n" }}{{ end }}',
        "{{- end }}",
        '{{- if and $last (ne .Role "assistant") }}{{ "<|im_start|>assistant\\n" }}{{ end }}',
        "{{- end }}",
    ])


@pytest.mark.parametrize("template, why", [
    ("{{ messages | length }} messages", "adding to a conversation changes how its start renders"),
    ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
     "{{ m['content'] }}{% endfor %}", "a system conversation raises TemplateError: no system role"),
])
def test_a_template_that_does_not_render_message_by_message_is_refused(template, why):
    tokenizer = make_chatml_tokenizer(chat_template=template)
    with pytest.raises(ChatforgeError, match=r"^odd: its chat template does not render one message at a time \("
                                             + re.escape(why)):
        turn_format(tokenizer, tokenizer.chat_template, "odd")


def test_model_init_accepts_the_exported_file(exported, tmp_path, monkeypatch):
    """What the tokenizer and pretrain stages do with `model.init=<file>.gguf`."""
    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    model, tokenizer, paths = exported
    folder = resolve(str(paths["f16"]))
    adopted, added = adopt_tokenizer(folder, str(paths["f16"]))
    assert added == [] and end_of_turn_id(adopted) == end_of_turn_id(tokenizer)
    assert adopted.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"] == \
        tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]
    loaded = load_initial_model(ModelConfig(init=str(paths["f16"]), context_length=64), adopted)
    ids = torch.tensor([tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]])
    with torch.no_grad():  # transformers' GGUF tokenizer adds GPT-2's <|endoftext|> as one more (unused) row
        assert torch.allclose(loaded(ids).logits[..., :len(tokenizer)], model(ids).logits, atol=1e-2)


def test_the_pipeline_starts_from_the_exported_file(exported, tmp_path, monkeypatch):
    """`model.init=<file>.gguf` through the tokenizer, tokenize and pretrain stages (0 steps: base is the init)."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("CHATFORGE_CACHE", str(tmp_path / "cache"))
    model, tokenizer, paths = exported
    write_clean_splits(tmp_path, train=40, val=6)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({
        "model": {"init": str(paths["f16"]), "context_length": 32},
        "pretrain": {"batch_size": 2, "max_steps": 0, "eval_steps": 1000, "threads": 1, "ngram_order": 2}}))
    for stage in ("tokenizer", "tokenize_corpus", "pretrain"):
        run_stage(stage, tmp_path)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "models" / "base")
    ids = torch.tensor([tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(base(ids).logits[..., :len(tokenizer)], model(ids).logits, atol=1e-2)


def test_a_lora_adapter_folder_is_merged_before_export(model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    adapted = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                             LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, weight in adapted.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.5)
    adapted.save_pretrained(tmp_path / "adapter")
    model, tokenizer = load_source(tmp_path / "adapter")
    ids = torch.tensor([[1, 7, 30, 42]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, adapted(ids).logits, atol=1e-5)
    assert not any("lora" in name for name in model.state_dict()) and tokenizer.chat_template


def test_the_command_writes_the_types_asked_and_checks_them(model_dir, tmp_path, capsys):
    main(["export", str(model_dir), "--out", str(tmp_path), "--types", "f16", "--check"])
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".Modelfile", ".gguf"]
    assert "-f16.gguf: logits max |Δ| " in capsys.readouterr().err.replace("\n", " ")


def test_a_refused_architecture_is_one_line_and_leaves_no_file(tmp_path, tiny_tokenizer, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2,
                        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    tiny_tokenizer.save_pretrained(tmp_path / "gpt2")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["export", str(tmp_path / "gpt2"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    assert stderr.strip().count("\n") == 0 and "Traceback" not in stderr
    assert "architecture gpt2 (GPT2LMHeadModel); chatforge export writes Llama-architecture models" in stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def _tokenizer_with(pre_tokenizer, decoder):
    from tokenizers import Tokenizer, models, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer, core.decoder = pre_tokenizer, decoder
    core.train_from_iterator(["hello world 123"] * 4, trainers.BpeTrainer(vocab_size=40, show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=core)


def test_tokenizers_are_written_or_refused_by_their_pre_tokenizer(model_dir):
    from tokenizers import decoders, pre_tokenizers

    model, _ = load_source(model_dir)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    smollm = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    assert check_exportable(model, _tokenizer_with(smollm, decoders.ByteLevel()), "m") == "smollm"
    with pytest.raises(ChatforgeError, match=r"^m: pre-tokenizer Whitespace has no llama.cpp counterpart"):
        check_exportable(model, _tokenizer_with(pre_tokenizers.Whitespace(), decoders.ByteLevel()), "m")
    with pytest.raises(ChatforgeError, match=r"^m: a BPE tokenizer \(decoder Metaspace, normalizer None\); chatforge "
                                             r"export writes byte-level BPE"):
        check_exportable(model, _tokenizer_with(byte_level, decoders.Metaspace()), "m")


def test_unknown_types_are_one_line():
    assert parse_types("F16, q8_0,f16") == ["f16", "q8_0"]
    with pytest.raises(ChatforgeError, match=r"^--types f16,q4_k: q4_k unknown; give a comma-separated list of f32"):
        parse_types("f16,q4_k")


def test_an_untied_output_matrix_is_written_as_output(tmp_path, tiny_tokenizer):
    model = make_loud_llama(tiny_tokenizer)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))
    path = write_gguf(tmp_path / "untied.gguf", model, tiny_tokenizer, "f32").path
    tensors = {t.name: t for t in GGUFReader(path).tensors}
    assert np.array_equal(np.asarray(tensors["output.weight"].data), model.lm_head.weight.detach().numpy())
    assert round_trip(model, tiny_tokenizer, path).max_abs_logit_diff == 0.0
