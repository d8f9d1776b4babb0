"""`Checkpoints` for a Hugging Face Trainer (sft, reward, dpo): the Trainer saves, `TrainerCheckpoints` commits.

Apart from checkpoints.py because transformers' Trainer machinery costs ~130 MB of imports that pretrain and ppo,
which checkpoint without a Trainer, do not need.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from transformers import TrainerCallback

from chatforge.training.checkpoints import Checkpoints

EPOCH_RNG_FILE = "epoch_start_rng.safetensors"


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

        self.checkpoints, self.every, self.resume_from = checkpoints, every, resume_from
        self.resumed_step = Checkpoints.state(resume_from)["step"] if resume_from else 0
        self.replay_rng = load_file(resume_from / EPOCH_RNG_FILE)["torch"] if resume_from else None
        self.epoch_start_rng = None

    @classmethod
    def open(cls, directory: str | Path, stage: str, params, inputs: dict) -> TrainerCheckpoints:
        """The checkpoints of `stage` in `directory` for a run of `params` (a TrainerParams) on `inputs` (their
        digests), every `params.checkpoint_every` steps, resuming the last one made from the same params and
        inputs (`Checkpoints.resumable`)."""
        checkpoints = Checkpoints(Path(directory), stage, {"params": dataclasses.asdict(params), "inputs": inputs})
        return cls(checkpoints, params.checkpoint_every, checkpoints.resumable())

    @property
    def resume_from_checkpoint(self) -> str | None:
        """The Trainer's `train(resume_from_checkpoint=...)`."""
        return str(self.resume_from) if self.resume_from else None

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
