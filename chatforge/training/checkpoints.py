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

from chatforge.console import log
from chatforge.files import file_sha256

STATE_FILE = "chatforge_state.json"
COMPLETE_FILE = "complete.json"


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


def open_live(live_dir: str | Path, resumed_through: int | None = None):
    """The stage's dvclive run: fresh, or, resuming (`resumed_through` the last step whose rows the checkpoint
    covers), continued after dropping the rows the killed run logged past it."""
    from dvclive import Live

    if resumed_through is not None:
        trim_live(live_dir, resumed_through)
    return Live(dir=str(live_dir), resume=resumed_through is not None, dvcyaml=False, save_dvc_exp=False)


def trim_live(live_dir: str | Path, step: int) -> None:
    """Drop dvclive rows logged after `step` (by the killed run after its last checkpoint), so a resumed run's
    curves have each step once."""
    for table in Path(live_dir).glob("plots/metrics/**/*.tsv"):
        lines = table.read_text(encoding="utf-8").splitlines()
        column = lines[0].split("\t").index("step")
        kept = lines[:1] + [line for line in lines[1:] if int(line.split("\t")[column]) <= step]
        table.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
