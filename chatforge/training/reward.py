"""Reward model training: trl's RewardTrainer on the SFT weights with a new one-label score head.

The pairs are tokenized here (not by trl) with `chatforge.reward_model.encode_conversation`, so training
and every later scoring (PPO, evaluate) render and truncate a conversation identically: trl would drop
a pair longer than `max_length`; we keep its end (the reply the reward is read at) and drop old prompt
tokens instead. `reward.lora` trains LoRA adapters plus the whole (new) score head and saves the merged model;
the stage checkpoints every `checkpoint_every` steps and resumes a killed run (docs/finetuning.md).
`reward.freeze_backbone` fits the score head alone as a linear probe on features computed once, without trl
(`reward_probe.py`: trl would recompute the frozen backbone every step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification
from transformers.trainer_callback import PrinterCallback

from chatforge.console import log, progress
from chatforge.errors import ChatforgeError
from chatforge.files import atomic_path
from chatforge.params import require
from chatforge.stats import pair_accuracy
from chatforge.reward_model import encode_conversation, load_reward_model, max_length_of, score_conversations
from chatforge.tokenization import end_of_turn_id, load_tokenizer
from chatforge.training.checkpoints import digest, digest_json, open_live
from chatforge.training.trainer_checkpoints import TrainerCheckpoints
from chatforge.training.live import LiveCallback
from chatforge.training.lora import add_adapters, describe_trainable, merge_adapters
from chatforge.training.reward_probe import FOLDS, fit_probe
from chatforge.training.trainer_params import TrainerParams
from chatforge.runtime import default_device, stage_precision, start_stage

STAGE = "reward"


@dataclass
class RewardParams(TrainerParams):
    """params.yaml section `reward`: the shared trainer knobs (trainer_params.py; `batch_size` is pairs, each
    two sequences) and these."""

    epochs: float = 2.0
    max_length: int = 256  # tokens of prompt + reply; longer prompts lose their oldest tokens
    center_rewards_coefficient: float = 0.01  # keeps scores near 0 (Eisenstein et al. 2023)
    bucket_by_length: bool = True  # batches of similar length in shuffled order: far less padding
    max_val_pairs: int | None = None  # val accuracy on a fixed sample of this many pairs; null = all
    freeze_backbone: bool = False  # true: only the score head trains, on the initial model's features (a linear probe)
    probe_l2: list[float] = dataclasses.field(default_factory=lambda: [0.001, 0.01, 0.1, 1.0, 10.0])  # freeze_backbone:
    # L2 strengths of the probe, one chosen by 5-fold cross-validation on the train pairs (reward_probe.py)

    RENAMED = {"warmup": "warmup_steps"}

    def validate(self, section: str) -> None:
        super().validate(section)
        require(self.epochs > 0, f"{section}.epochs", "must be > 0 (the length buckets are drawn per epoch)")
        require(self.max_length >= 8, f"{section}.max_length", "must be >= 8")
        require(self.center_rewards_coefficient >= 0, f"{section}.center_rewards_coefficient", "must be >= 0")
        require(self.max_val_pairs is None or self.max_val_pairs >= 1, f"{section}.max_val_pairs",
                "must be >= 1 or null (all)")
        require(not (self.freeze_backbone and self.lora), f"{section}.freeze_backbone",
                "true trains the score head only; set lora: null with it (adapters would train the backbone)")
        require(bool(self.probe_l2) and all(l2 >= 0 for l2 in self.probe_l2), f"{section}.probe_l2",
                "must be a non-empty list of L2 strengths >= 0")


def load_initial_model(sft_dir: Path, tokenizer):
    """The SFT checkpoint as a one-label sequence classifier: its transformer weights, a new score head."""
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    if not (sft_dir / "config.json").exists():
        raise ChatforgeError(f"{sft_dir}: no config.json; run `dvc repro sft` first")
    with suppress_seqcls_warning():  # lm_head unused and score new: expected, not worth a warning
        model = AutoModelForSequenceClassification.from_pretrained(
            str(sft_dir), num_labels=1, dtype=torch.float32, use_safetensors=True)
    end_ids = {tokenizer.eos_token_id, end_of_turn_id(tokenizer)}
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in end_ids:
        raise ChatforgeError(f"{sft_dir}: the tokenizer's pad token must exist and differ from eos and the end of a "
                             "turn (the reward is read at the last non-pad token); rebuild the tokenizer")
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def pair_length(row: dict) -> int:
    """Padded width a pair needs (both sequences go into one batch)."""
    return max(len(row["chosen_ids"]), len(row["rejected_ids"]))


def tokenize_pairs(pairs: list[dict], tokenizer, max_length: int):
    """A datasets.Dataset of trl's processed preference format: chosen_ids / rejected_ids."""
    from datasets import Dataset

    rows = {"chosen_ids": [], "rejected_ids": []}
    for pair in pairs:
        rows["chosen_ids"].append(encode_conversation(tokenizer, pair["prompt"] + pair["chosen"], max_length))
        rows["rejected_ids"].append(encode_conversation(tokenizer, pair["prompt"] + pair["rejected"], max_length))
    return Dataset.from_dict(rows)


def bucketed_order(lengths: list[int], batch_size: int, epochs: float, seed: int) -> list[int]:
    """Example indices for `epochs` passes, in batches of similar length whose order is shuffled.

    Random batches of chat data are mostly padding (measured: 30% real tokens on the default data); sorting
    into length buckets and shuffling the batches keeps batches random in content but ~90% real tokens.
    Each epoch draws its own arrangement; its last, partial batch is topped up with random examples so
    that every epoch is whole batches (the trainer cuts the flat order into fixed windows); a fractional
    last epoch takes its first batches.
    """
    rng = random.Random(seed)
    batches_per_epoch = math.ceil(len(lengths) / batch_size)
    order: list[int] = []
    for _ in range(math.ceil(epochs)):
        jitter = {i: rng.random() for i in range(len(lengths))}  # random order among equal lengths
        by_length = sorted(range(len(lengths)), key=lambda i: (lengths[i], jitter[i]))
        by_length += rng.sample(by_length, batches_per_epoch * batch_size - len(by_length))
        batches = [by_length[start:start + batch_size] for start in range(0, len(by_length), batch_size)]
        rng.shuffle(batches)
        order += [index for batch in batches for index in batch]
    return order[:math.ceil(batches_per_epoch * epochs) * batch_size]


def train_reward_model(sft_dir: Path, train_pairs: list[dict], val_pairs: list[dict], params: RewardParams,
                       out_dir: Path, live_dir: Path, checkpoint_dir: Path | None = None) -> dict:
    """Train, evaluate on the val pairs, save model + tokenizer to `out_dir`; returns the report. With
    `checkpoint_dir`, checkpoint there and resume a checkpoint made from the same params and inputs."""
    if not train_pairs or not val_pairs:
        raise ChatforgeError(f"no preference pairs (train {len(train_pairs)}, val {len(val_pairs)}); "
                             "check reports/preferences.json and the preferences section of params.yaml")
    start = time.perf_counter()
    start_stage(params.seed, params.threads)
    device = default_device()
    cast = stage_precision(STAGE, device, params.precision)

    tokenizer = load_tokenizer(sft_dir, stage_hint="sft")
    model = load_initial_model(sft_dir, tokenizer)
    max_length = max_length_of(model, params.max_length)
    train_set = tokenize_pairs(train_pairs, tokenizer, max_length)
    val_set = tokenize_pairs(val_pairs, tokenizer, max_length)
    val_set = val_set.select(sorted(range(len(val_set)), key=lambda i: pair_length(val_set[i])))
    if params.bucket_by_length:  # the trainer then reads the examples in this order ("sequential")
        lengths = [pair_length(row) for row in train_set]
        # one bucket per optimizer step, its micro-batches consecutive in it
        pairs_per_step = params.batch_size * params.gradient_accumulation_steps
        train_set = train_set.select(bucketed_order(lengths, pairs_per_step, params.epochs, params.seed))
        epochs = 1.0
    else:
        epochs = params.epochs
    steps = params.max_steps or math.ceil(math.ceil(math.ceil(len(train_set) / params.batch_size)
                                                    / params.gradient_accumulation_steps) * epochs)
    training = "a linear probe" if params.freeze_backbone else (
        f"{steps} steps of {params.batch_size * params.gradient_accumulation_steps} pairs")
    log(STAGE, f"{len(train_pairs)} train / {len(val_pairs)} val pairs, {model.num_parameters():,} parameters, "
               f"{training}")
    probe = None
    with atomic_path(out_dir, is_dir=True) as tmp:
        train_start = time.perf_counter()
        if params.freeze_backbone:
            log(STAGE, f"backbone frozen: the score head is a linear probe on its features, L2 from "
                       f"{params.probe_l2} by {FOLDS}-fold cross-validation on the train pairs")
            probe = fit_probe(model, tokenizer, train_pairs, params.probe_l2, max_length, params.eval_batch_size,
                              params.seed, cast)
            log(STAGE, f"probe: L2 {probe['l2']}, cross-validated accuracy {probe['cv_accuracy']}")
            log_probe(live_dir, probe)
            trained, steps, checkpointing = model, 0, None
        else:
            trained, checkpointing = train_with_trl(
                model, tokenizer, train_set, val_set, params, epochs, steps, cast, device,
                {"sft": digest(sft_dir), "train": digest_json(train_pairs), "val": digest_json(val_pairs)},
                live_dir, checkpoint_dir)
        train_seconds = time.perf_counter() - train_start
        trained.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        # Evaluate the saved artifact as PPO and evaluate will load it: fp32, outside accelerate's autocast wrapper.
        model, tokenizer = load_reward_model(tmp)
        report = evaluate_pairs(model, tokenizer, val_pairs, params.eval_batch_size, max_length)
    if checkpointing:
        checkpointing.checkpoints.complete(steps)
    report.update({
        "train_pairs": len(train_pairs),
        "val_pairs": len(val_pairs),
        "steps": steps,
        "parameters": model.num_parameters(),
        "precision": "fp32" if cast is None else str(cast).removeprefix("torch."),
        "train_seconds": round(train_seconds, 1),
        "resumed_from_step": checkpointing.resumed_step if checkpointing else 0,
        "wall_seconds": round(time.perf_counter() - start, 1),
        **({"probe": probe} if probe else {}),
    })
    return report


def log_probe(live_dir: Path, probe: dict) -> None:
    """The probe's cross-validated accuracy per L2 strength, as the stage's dvclive curve (x: candidate index)."""
    live = open_live(live_dir)
    for l2, score in probe["cv_accuracy"].items():
        live.log_metric("probe/l2", float(l2))
        live.log_metric("probe/cv_accuracy", score if score is not None else float("nan"))
        live.next_step()
    live.end()


def train_with_trl(model, tokenizer, train_set, val_set, params: RewardParams, epochs: float, steps: int, cast,
                   device, inputs: dict, live_dir: Path, checkpoint_dir: Path | None):
    """trl's RewardTrainer on LoRA adapters or the whole model (and the new score head), checkpointed every
    `checkpoint_every` steps and resumed from a checkpoint of the same params and `inputs`; returns (the trained
    model, adapters merged; its TrainerCheckpoints, to complete once the model is saved, or None without
    `checkpoint_dir`)."""
    from trl import RewardConfig, RewardTrainer

    if params.lora:
        model = add_adapters(model, params.lora, f"{STAGE}.lora", task="SEQ_CLS")
        log(STAGE, f"LoRA r={params.lora.r} on {params.lora.target_modules} and the score head: "
                   f"{describe_trainable(model)}")
    checkpointing = TrainerCheckpoints.open(checkpoint_dir, STAGE, params, inputs) if checkpoint_dir else None
    resumed_step = checkpointing.resumed_step if checkpointing else 0

    with contextlib.ExitStack() as stack:
        saving = checkpointing.trainer_args() if checkpointing else {
            "output_dir": stack.enter_context(tempfile.TemporaryDirectory()), "save_strategy": "no"}
        config = params.training_args(
            RewardConfig, cast,
            **saving,
            num_train_epochs=epochs,
            train_sampling_strategy="sequential" if params.bucket_by_length else "random",
            center_rewards_coefficient=params.center_rewards_coefficient or None,
            max_length=None,  # already truncated by encode_conversation
        )
        live = open_live(live_dir, resumed_step or None)
        with progress() as bar:
            task = bar.add_task("reward", total=steps, completed=resumed_step, info="")
            callbacks = [LiveCallback(live, bar, task), *([checkpointing] if checkpointing else [])]
            trainer = RewardTrainer(model=model, args=config, train_dataset=train_set, eval_dataset=val_set,
                                    processing_class=tokenizer, callbacks=callbacks)
            trainer.remove_callback(PrinterCallback)  # the rich bar and dvclive show the logs
            trainer.train(resume_from_checkpoint=checkpointing.resume_from_checkpoint if checkpointing else None)
        live.end()
    return merge_adapters(trainer.model), checkpointing


def evaluate_pairs(model, tokenizer, pairs: list[dict], batch_size: int, max_length: int | None = None) -> dict:
    """Pairwise accuracy (overall, per origin, per origin/strategy), mean margin and chosen-score statistics."""
    chosen = score_conversations(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs], batch_size, max_length)
    rejected = score_conversations(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs], batch_size, max_length)
    margins = [good - bad for good, bad in zip(chosen, rejected)]
    return {
        **pair_accuracy(pairs, [margin > 0 for margin in margins]),
        "mean_margin": round(statistics.fmean(margins), 4),
        "chosen_score_mean": statistics.fmean(chosen),
        "chosen_score_std": statistics.pstdev(chosen) if len(chosen) > 1 else 0.0,
        "rejected_score_mean": statistics.fmean(rejected),
    }
