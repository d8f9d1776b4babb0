"""GGUF export: a trained model as one file that llama.cpp, Ollama and LM Studio run, with its tokenizer, chat
template, stop tokens and context inside (`chatforge export`, docs/export.md).

Written with llama.cpp's own gguf-py in the conventions of its `convert_hf_to_gguf.py`, so that llama.cpp and
transformers' GGUF loader (`model.init=<file>.gguf`) both read it:
- architecture `llama` with its `llama.*` hyperparameters; `llama.context_length` is the model's own context
  (`max_position_embeddings`), not the pipeline's `training_window`, as chat and serve use it;
- tensor names from gguf's `TensorNameMap` (the table transformers' loader reads them back with); q and k rows
  permuted into llama.cpp's rope layout, which that loader undoes;
- 1-D tensors (norms) stay F32; matrices take the requested type, Q8_0 falling back to F16 for a matrix whose
  rows are not whole 32-value blocks, as the converter does;
- the tokenizer as llama.cpp's `gpt2` (byte-level BPE) model: tokens in id order, their types (special → CONTROL,
  other added → USER_DEFINED, embedding rows beyond the tokenizer → UNUSED `[PADn]`), merges, the bos/eos/pad/unk
  ids, and the end of turn as `eot`, which llama.cpp stops at besides eos.

gguf's `BpeVocab`/`SpecialVocab` helpers read a saved folder and type every token inside the BPE vocabulary as
NORMAL, which is where our trained special tokens (`<|end|>`, ...) sit: llama.cpp would then print `<|end|>` as text
and never stop. So the vocabulary comes from the tokenizer object, as the converter's `get_vocab_base` takes it.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chatforge.errors import ChatforgeError

# --types name -> (tensor type of the matrices, general.file_type)
TYPES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"),
         "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
DEFAULT_TYPES = "f16,q8_0"

# A Hugging Face pre-tokenizer's steps -> llama.cpp's name for the same split (`tokenizer.ggml.pre`): the GPT-2
# regex, and SmolLM's digits one by one before it. A step is (type, individual_digits, use_regex, add_prefix_space).
PRE_TOKENIZERS = {
    (("ByteLevel", None, True, False),): "gpt-2",
    (("Digits", True, None, None), ("ByteLevel", None, True, False)): "smollm",
}

# transformers' training-mask markers, which other Jinja engines reject (jinja2: "unknown tag 'generation'")
_GENERATION_TAG = re.compile(r"\{%-?\s*(?:end)?generation\s*-?%\}")
_TEMPLATE_PROBE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"}]
# conversations whose logits the round trip compares
ROUND_TRIP_PROBES = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hi there!"},
     {"role": "assistant", "content": "Hello! How can I help you today?"},
     {"role": "user", "content": "Tell me a joke about computers, 3 lines."}],
]


@dataclass(frozen=True)
class Written:
    path: Path
    type: str
    bytes: int
    seconds: float


@dataclass(frozen=True)
class RoundTrip:
    """The source model against the file as transformers' GGUF loader reads it back, on ROUND_TRIP_PROBES."""

    positions: int
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    argmax_agreement: float  # share of positions whose most likely next token is the same
    same_token_ids: bool  # the file's tokenizer encodes the rendered probes to the same ids


def parse_types(text: str) -> list[str]:
    types = [t.strip().lower() for t in text.split(",") if t.strip()]
    unknown = [t for t in types if t not in TYPES]
    if unknown or not types:
        raise ChatforgeError(f"--types {text}: {', '.join(unknown) or 'none given'} unknown; "
                             f"give a comma-separated list of {', '.join(TYPES)}")
    return list(dict.fromkeys(types))


def load_source(folder: Path):
    """(model, tokenizer) of a saved model folder, fp32 on the CPU; a peft LoRA adapter folder is merged into its
    base model first (the pipeline's own stages already save merged models)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from chatforge.tokenization import load_tokenizer

    transformers_logging.disable_progress_bar()  # export logs each file it writes instead
    if not folder.is_dir():
        raise ChatforgeError(f"{folder}: no such model folder; give a folder saved by a stage (models/sft, ...)")
    adapter = (folder / "adapter_config.json").exists()
    if not adapter and not (folder / "config.json").exists():
        raise ChatforgeError(f"{folder}: no config.json; give a model folder saved with save_pretrained")
    options = {"dtype": torch.float32, "use_safetensors": True, "trust_remote_code": False}
    try:
        if adapter:
            from peft import AutoPeftModelForCausalLM

            model = AutoPeftModelForCausalLM.from_pretrained(str(folder), **options).merge_and_unload()
        else:
            model = AutoModelForCausalLM.from_pretrained(str(folder), **options)
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        raise ChatforgeError(f"{folder}: cannot load the model ({first}); give a folder saved with "
                             f"save_pretrained (safetensors)") from None
    # an adapter saved without its tokenizer uses its base model's
    beside = folder if (folder / "tokenizer.json").exists() or not adapter else Path(model.config._name_or_path)
    if not (beside / "tokenizer.json").exists():
        raise ChatforgeError(f"{folder}: no tokenizer.json; save the model's tokenizer beside it (save_pretrained)")
    return model.eval(), load_tokenizer(beside)


def check_exportable(model, tokenizer, where: str) -> str:
    """Refuse in one line what this writer cannot represent; returns llama.cpp's pre-tokenizer name."""
    config = model.config
    if config.model_type != "llama":
        raise ChatforgeError(f"{where}: architecture {config.model_type} ({', '.join(config.architectures or [])}); "
                             f"chatforge export writes Llama-architecture models (LlamaForCausalLM) only")
    rope_type = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope_type != "default" or config.attention_bias or config.mlp_bias:
        raise ChatforgeError(f"{where}: a Llama with rope_type {rope_type}, attention_bias {config.attention_bias}, "
                             f"mlp_bias {config.mlp_bias}; chatforge export writes Llamas with default rope and no "
                             f"biases only")
    if not tokenizer.is_fast:
        raise ChatforgeError(f"{where}: a slow (Python) tokenizer; export reads a fast tokenizer's tokenizer.json")
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    kind, decoder = backend["model"]["type"], (backend.get("decoder") or {}).get("type")
    normalizer = (backend.get("normalizer") or {}).get("type")
    if kind != "BPE" or backend["model"].get("byte_fallback") or decoder != "ByteLevel" or normalizer:
        raise ChatforgeError(f"{where}: a {kind} tokenizer (decoder {decoder}, normalizer {normalizer}); chatforge "
                             f"export writes byte-level BPE tokenizers without a normalizer (llama.cpp `gpt2`) only")
    pre = backend.get("pre_tokenizer") or {}
    steps = tuple((s["type"], s.get("individual_digits"), s.get("use_regex"), s.get("add_prefix_space"))
                  for s in pre.get("pretokenizers", [pre] if pre else []))
    if steps not in PRE_TOKENIZERS:
        raise ChatforgeError(f"{where}: pre-tokenizer {'+'.join(s[0] for s in steps) or 'none'} has no llama.cpp "
                             f"counterpart here; chatforge export writes the GPT-2 byte-level split (ByteLevel, "
                             f"optionally after Digits) only")
    ids = sorted(tokenizer.get_vocab().values())
    if ids != list(range(len(ids))) or len(ids) > config.vocab_size:
        raise ChatforgeError(f"{where}: token ids are not 0..{len(ids) - 1} within the model's {config.vocab_size} "
                             f"embedding rows; resize the embeddings to the tokenizer (resize_token_embeddings)")
    return PRE_TOKENIZERS[steps]


def portable_chat_template(tokenizer, where: str) -> str:
    """The chat template without transformers' `{% generation %}` markers (they only mark training masks, and
    other Jinja engines reject them); refused when dropping them changes a rendering."""
    from chatforge.tokenization import chat_text

    template = tokenizer.get_chat_template()
    portable = _GENERATION_TAG.sub("", template)
    if chat_text(tokenizer, _TEMPLATE_PROBE, True, portable) != chat_text(tokenizer, _TEMPLATE_PROBE, True):
        raise ChatforgeError(f"{where}: its chat template renders differently without its {{% generation %}} "
                             f"markers; write them without whitespace control ({{% generation %}}, not {{%- ... -%}})")
    return portable


def write_gguf(path: Path, model, tokenizer, type_name: str, name: str | None = None) -> Written:
    """`model` and `tokenizer` as one GGUF of `type_name` (TYPES) at `path`, written atomically."""
    import gguf

    from chatforge.console import progress
    from chatforge.files import atomic_path

    where = name or str(path)
    pre_tokenizer = check_exportable(model, tokenizer, where)
    template = portable_chat_template(tokenizer, where)
    tensor_type, file_type = (gguf.GGMLQuantizationType[TYPES[type_name][0]],
                              gguf.LlamaFileType[TYPES[type_name][1]])
    started = time.perf_counter()
    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        writer.add_name(name or path.stem)
        writer.add_file_type(file_type)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_hyperparameters(writer, model.config)
        _add_tokenizer(writer, tokenizer, model.config.vocab_size, pre_tokenizer, template)
        names, state = _gguf_names(model), model.state_dict()
        with progress(transient=True) as bar:
            task = bar.add_task(f"{path.name}", total=len(names), info="")
            for hf_name, gguf_name in names:  # one tensor converted at a time: no second copy of the model
                data, data_type = _encode(_llama_cpp_layout(gguf_name, state[hf_name], model.config), tensor_type)
                writer.add_tensor(gguf_name, data, raw_dtype=data_type)
                bar.update(task, advance=1, info=gguf_name)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Written(path, type_name, path.stat().st_size, round(time.perf_counter() - started, 2))


def _add_hyperparameters(writer, config) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_vocab_size(config.vocab_size)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim * heads != config.hidden_size:  # llama.cpp assumes hidden / heads unless told
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def _add_tokenizer(writer, tokenizer, vocab_size: int, pre_tokenizer: str, template: str) -> None:
    from gguf import TokenType

    from chatforge.tokenization import end_of_turn_id

    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    added = tokenizer.added_tokens_decoder
    types = [TokenType.NORMAL if i not in added else TokenType.CONTROL if added[i].special else TokenType.USER_DEFINED
             for i in range(len(tokens))]
    unused = range(len(tokens), vocab_size)  # embedding rows no token reaches (e.g. rounded up for speed)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens + [f"[PAD{i}]" for i in unused])
    writer.add_token_types([int(t) for t in types] + [int(TokenType.UNUSED)] * len(unused))
    # byte-level tokens never hold a space (it is spelled Ġ), so "a b" is unambiguous
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for kind in ("bos", "eos", "pad", "unk"):
        if (token_id := getattr(tokenizer, f"{kind}_token_id")) is not None:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    writer.add_eot_token_id(end_of_turn_id(tokenizer))
    # explicit flags: a reader that finds none may add a bos that the tokenizer never did
    probe = tokenizer("a")["input_ids"]
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and probe[:1] == [tokenizer.bos_token_id])
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and probe[-1:] == [tokenizer.eos_token_id])
    writer.add_chat_template(template)


def _gguf_names(model) -> list[tuple[str, str]]:
    """(transformers name, GGUF name) of every tensor to write. A tied output matrix is left out, which is how
    readers know it is tied."""
    import gguf

    config = model.config
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    names = []
    for hf_name in model.state_dict():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        gguf_name = table.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ChatforgeError(f"{hf_name}: a weight llama.cpp's llama architecture has no name for; chatforge "
                                 f"export writes plain LlamaForCausalLM weights only")
        names.append((hf_name, gguf_name))
    return names


def _llama_cpp_layout(gguf_name: str, tensor, config) -> np.ndarray:
    """The tensor as an fp32 array in torch's shape order (GGUFWriter reverses it), q and k rows permuted."""
    import torch

    weight = tensor.detach().to(torch.float32).cpu().numpy()
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(gguf_name.split(".")[-2])
    return _rope_permute(weight, heads) if heads else weight


def _rope_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order: each head's two rotary halves (transformers' rotate_half layout) interleaved in
    pairs, as its rope kernel reads them (convert_hf_to_gguf's `LlamaModel.permute`)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _encode(weight: np.ndarray, tensor_type):
    """(data, its GGML type): norms and other 1-D tensors in F32, matrices in `tensor_type` (F16 when Q8_0's
    32-value blocks do not tile a row)."""
    from gguf import GGMLQuantizationType, quants

    if weight.ndim == 1:
        tensor_type = GGMLQuantizationType.F32
    try:
        return quants.quantize(weight, tensor_type), tensor_type
    except quants.QuantError:
        return quants.quantize(weight, GGMLQuantizationType.F16), GGMLQuantizationType.F16


def round_trip(model, tokenizer, path: Path) -> RoundTrip:
    """Load `path` back as `model.init` does (transformers' GGUF loader, de-quantized to fp32) and compare."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chatforge.tokenization import chat_text

    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    diffs, agree, same_ids = [], [], True
    for conversation in ROUND_TRIP_PROBES:
        text = chat_text(tokenizer, conversation, generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        same_ids &= loaded_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
        with torch.no_grad():
            batch = torch.tensor([ids], device=model.device)
            expected = model(batch).logits[0].float().cpu()
            got = loaded(batch.cpu()).logits[0].float()
        diffs.append((got - expected).abs())
        agree.append(got.argmax(-1) == expected.argmax(-1))
    diff, agreement = torch.cat(diffs), torch.cat(agree)
    return RoundTrip(positions=len(agreement), max_abs_logit_diff=round(diff.max().item(), 5),
                     mean_abs_logit_diff=round(diff.mean().item(), 5),
                     argmax_agreement=round(agreement.float().mean().item(), 4), same_token_ids=bool(same_ids))


def export(model, tokenizer, folder: Path, out: Path, types: list[str]) -> list[Written]:
    """The model of `folder` (loaded with `load_source`) in each of `types` as `<out>/<name>-<type>.gguf`, with its
    Ollama `<name>-<type>.Modelfile`, `<name>` being the folder's; all refusals come before the first file."""
    from chatforge.console import log
    from chatforge.files import atomic_path
    from chatforge.inference.prompting import stop_ids
    from chatforge.inference.sampling import default_sampling
    from chatforge.modelfile import modelfile, turn_format

    where, name = str(folder), folder.resolve().name
    check_exportable(model, tokenizer, where)
    turns = turn_format(tokenizer, portable_chat_template(tokenizer, where), where)
    stops = tokenizer.convert_ids_to_tokens(stop_ids(tokenizer))
    written = []
    for type_name in types:
        done = write_gguf(out / f"{name}-{type_name}.gguf", model, tokenizer, type_name, name)
        with atomic_path(out / f"{name}-{type_name}.Modelfile") as tmp:
            tmp.write_text(modelfile(done.path.name, turns, stops, model.config.max_position_embeddings,
                                     default_sampling()), encoding="utf-8")
        log("export", f"{done.path} ({done.bytes / 1e6:.1f} MB in {done.seconds:.1f}s) and its Modelfile")
        written.append(done)
    return written
