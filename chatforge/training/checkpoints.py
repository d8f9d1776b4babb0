"""Resumable checkpoints of the training stages (pretrain, sft, reward, ppo, dpo): atomic step folders, the
fingerprint of what made them, and a finished run that leaves only `complete.json` (so DVC's persist out stays
small).

A checkpoint is `<dir>/step_NNNNNN/`. It is written under another name and renamed into place once every file
in it is complete, so a kill at any moment leaves the previous checkpoint intact. Its `chatforge_state.json`
holds the step and the fingerprint: the stage's params and a digest of each input. A restarted stage resumes
from the newest checkpoint whose fingerprint equals its own; otherwise it logs which params or inputs differ,
deletes the stale checkpoints and starts over. docs/finetuning.md lists what is loaded back from disk.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import TrainerCallback

from chatforge.console import log
from chatforge.files import file_sha256

STATE_FILE = "chatforge_state.json"
COMPLETE_FILE = "complete.json"
EPOCH_RNG_FILE = "epoch_start_rng.safetensors"


def digest(path: str | Path) -> str:
    """Content hash of a file, or of a folder's files (relative names and bytes)."""
    path, hasher = Path(path), hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        hasher.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        hasher.update(bytes.fromhex(file_sha256(file)))
    return hasher.hexdigest()[:16]


def digest_json(value) -> str:
    """Content hash of JSON-serializable data (records read by the stage)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _changed_params(saved, current, name: str) -> list[str]:
    """`name.key old → new` for each param that differs; nested sections (a LoRA mapping, several params.yaml
    sections) are compared key by key."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [change for key, value in current.items()
                for change in _changed_params(saved.get(key), value, f"{name}.{key}" if name else key)]
    return [] if saved == current else [f"{name} {saved!r} → {current!r}"]


def _differences(saved: dict, current: dict, section: str) -> list[str]:
    params = _changed_params(saved["params"], current["params"], section)
    inputs = [f"{name} changed" for name, value in current["inputs"].items() if saved["inputs"].get(name) != value]
    return params + inputs


@dataclass
class Checkpoints:
    """The checkpoint folder of one stage. `fingerprint` = {"params": {...}, "inputs": {name: digest}}; the params
    are the params.yaml section `section` (None: the stage's own), or, with `section=""`, keyed by section."""

    directory: Path
    stage: str
    fingerprint: dict
    section: str | None = None

    def steps(self) -> list[Path]:
        return sorted(p for p in self.directory.glob("step_*") if (p / STATE_FILE).is_file())

    def resumable(self) -> Path | None:
        """The newest complete checkpoint made from the same params and inputs, or None (and why, in the log).
        Everything else in the folder (stale or half-written checkpoints, the last run's marker) is removed."""
        found, reason = None, None
        if self.steps():
            newest = self.steps()[-1]
            saved = self.state(newest)["fingerprint"]
            if saved == self.fingerprint:
                found = newest
            else:
                section = self.stage if self.section is None else self.section
                changes = _differences(saved, self.fingerprint, section) or ["the fingerprint's layout"]
                reason = f"not resuming {newest}: it was made with other params or inputs ({'; '.join(changes)})"
        if self.directory.exists():
            for entry in self.directory.iterdir():
                if entry != found:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        if reason:
            log(self.stage, f"{reason}; starting from step 0")
        elif found:
            log(self.stage, f"resuming from {found} at step {self.state(found)['step']}")
        return found

    @staticmethod
    def state(path: Path) -> dict:
        return json.loads((path / STATE_FILE).read_text(encoding="utf-8"))

    def staging(self, step: int, fresh: bool = True) -> Path:
        """The folder to write checkpoint `step` into (emptied when `fresh`); `commit` renames it into place."""
        path = self.directory / f".tmp_step_{step:06d}"
        if fresh:
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        return path

    def commit(self, folder: Path, step: int, extra: dict | None = None) -> Path:
        """Write the state file into the finished `folder`, rename it to `step_NNNNNN`, drop older checkpoints."""
        state = {"step": step, "fingerprint": self.fingerprint, **(extra or {})}
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2, ensure_ascii=False), encoding="utf-8")
        target = self.directory / f"step_{step:06d}"
        shutil.rmtree(target, ignore_errors=True)
        folder.rename(target)
        for old in self.steps():
            if old != target:
                shutil.rmtree(old)
        return target

    def complete(self, step: int) -> None:
        """The run is finished and its output written: keep only a small marker, so the next run starts fresh."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for entry in self.directory.iterdir():
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        (self.directory / COMPLETE_FILE).write_text(
            json.dumps({"step": step, "fingerprint": self.fingerprint}, indent=2, ensure_ascii=False), encoding="utf-8")


class TrainerCheckpoints(TrainerCallback):
    """Checkpointing of a Hugging Face Trainer into `Checkpoints`, with the Trainer's own save and resume.

    The Trainer writes `checkpoint-N/` (weights as safetensors; optimizer, scheduler and RNG states as torch
    pickles, which it loads back with `weights_only=True`) every `every` steps; when it is done, `on_save`
    commits that folder as `step_N`, so only whole checkpoints count. The Trainer's extra save at the last
    step is skipped: the stage writes its output and `complete` replaces the checkpoints then.

    Resuming mid-epoch, the Trainer skips the epoch's first batches but draws the epoch's shuffled order from
    the freshly seeded RNG, which matches the killed run only in epoch 0. So each checkpoint also keeps the
    torch RNG state of its epoch's start, and the resumed epoch begins from it: same order, same batches.
    """

    def __init__(self, checkpoints: Checkpoints, every: int, resume_from: Path | None = None):
        from safetensors.torch import load_file

        self.checkpoints, self.every = checkpoints, every
        self.replay_rng = load_file(resume_from / EPOCH_RNG_FILE)["torch"] if resume_from else None
        self.epoch_start_rng = None

    def trainer_args(self) -> dict:
        return {"output_dir": str(self.checkpoints.directory), "save_strategy": "steps", "save_steps": self.every,
                "save_total_limit": None, "save_only_model": False}

    def on_epoch_begin(self, args, state, control, **kwargs):
        if self.replay_rng is not None:  # the Trainer restores the checkpoint's own RNG state after drawing
            torch.set_rng_state(self.replay_rng)
            self.replay_rng = None
        self.epoch_start_rng = torch.get_rng_state()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= state.max_steps:
            control.should_save = False
        return control

    def on_save(self, args, state, control, **kwargs):
        from accelerate import PartialState
        from safetensors.torch import save_file

        PartialState().wait_for_everyone()  # every process has written its RNG state
        if state.is_world_process_zero:
            folder = self.checkpoints.directory / f"checkpoint-{state.global_step}"
            (folder / "training_args.bin").unlink(missing_ok=True)  # a pickle nothing reads back
            save_file({"torch": self.epoch_start_rng}, str(folder / EPOCH_RNG_FILE))
            self.checkpoints.commit(folder, state.global_step)
        PartialState().wait_for_everyone()


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The weights an optimizer changes (all of them, or only the LoRA adapters and heads), for safetensors."""
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_trainable_state(model, tensors: dict[str, torch.Tensor]) -> None:
    parameters = dict(model.named_parameters())
    expected = {name for name, p in parameters.items() if p.requires_grad}
    if set(tensors) != expected:  # the fingerprint makes this a bug, not a user error
        raise RuntimeError(f"checkpoint weights do not match the model's trainable ones: {sorted(set(tensors) ^ expected)[:5]}")
    for name, tensor in tensors.items():
        parameters[name].copy_(tensor)


def trim_live(live_dir: str | Path, step: int) -> None:
    """Drop dvclive rows logged after `step` (by the killed run after its last checkpoint), so a resumed run's
    curves have each step once."""
    for table in Path(live_dir).glob("plots/metrics/**/*.tsv"):
        lines = table.read_text(encoding="utf-8").splitlines()
        column = lines[0].split("\t").index("step")
        kept = lines[:1] + [line for line in lines[1:] if int(line.split("\t")[column]) <= step]
        table.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
