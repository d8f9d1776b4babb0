"""Causal-LM pretraining on packed text: the loop, its data, its schedule and its resumable checkpoints.

The train split is one token stream, `<|eos|>` before every record (`pack`; the pretrain stage reads it from the
tokenize stage's shards as a `token_shards.TokenStream`, which slices the same way); each epoch cuts it into
windows of `context_length + 1` tokens at a random offset (so a small corpus is seen in new contexts
every epoch) and shuffles them. The order is a pure function of (seed, window position), so resuming
needs only the position. Under `accelerate launch`, process r takes every world-th window.

Checkpoints (`training/checkpoints.py`, `step_NNNNNN/`: model weights as safetensors, optimizer state read back with
`torch.load(weights_only=True)`, RNG state, position) appear by an atomic rename, so a run killed at any
moment leaves the previous checkpoint intact. A checkpoint remembers a fingerprint of the params,
tokenizer and data; one from different inputs is discarded. After a complete run the checkpoint
directory keeps only `complete.json`: the next run starts fresh.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from chatforge.chat_windows import IGNORE_INDEX
from chatforge.console import log, progress
from chatforge.errors import ChatforgeError
from chatforge.lm_loss import Stream, evaluate_nats
from chatforge.modeling import build_model, count_parameters, load_initial_model, save_model
from chatforge.ngram import KneserNeyLM
from chatforge.params import require
from chatforge.pretrained import is_scratch
from chatforge.runtime import (autocast, autocast_dtype, describe_precision, release_freed_memory, start_stage,
                               training_attention)
from chatforge.stats import bits_per_byte
from chatforge.token_shards import MANIFEST, check_tokenizer, open_splits
from chatforge.tokenization import load_tokenizer
from chatforge.training.checkpoints import Checkpoints, digest, open_live

STAGE = "pretrain"


@dataclass
class PretrainConfig:
    """params.yaml section `pretrain`."""

    seed: int = 1337
    threads: int = 0                # torch threads; 0 = one per core
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    attention: Literal["auto", "sdpa", "eager"] = "auto"  # auto: eager on CPU, sdpa on GPUs (runtime.py)
    # bf16: the model computes in bf16 weights and the optimizer steps fp32 master copies (no per-step
    # weight casts: 1.4x faster on this CPU); fp32: fp32 weights under autocast. auto: bf16 on CPU.
    weights: Literal["auto", "bf16", "fp32"] = "auto"
    batch_size: int = 16            # sequences per micro-batch, per process
    gradient_accumulation_steps: int = 1
    max_steps: int = 300            # optimizer steps; 0 (a pretrained model.init only): no training, just evaluation
    learning_rate: float = 3e-3
    min_lr_ratio: float = 0.1       # the cosine decays to learning_rate * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    max_grad_norm: float = 1.0     # 0: no clipping
    eval_steps: int = 50
    checkpoint_every: int = 50
    ngram_order: int = 5            # the Kneser-Ney baseline reported beside the model
    ngram_discount: float = 0.75

    # Old key -> new key (transformers' TrainingArguments names, as in sft, reward and dpo): one line names the new.
    RENAMED = {"grad_accum_steps": "gradient_accumulation_steps", "grad_clip": "max_grad_norm",
               "eval_every": "eval_steps"}

    def validate(self, section: str) -> None:
        for key in ("batch_size", "gradient_accumulation_steps", "eval_steps", "checkpoint_every"):
            require(getattr(self, key) >= 1, f"{section}.{key}", "must be at least 1")
        require(self.max_steps >= 0, f"{section}.max_steps", "must be 0 or more")
        require(self.learning_rate > 0, f"{section}.learning_rate", "must be positive")
        require(0.0 <= self.min_lr_ratio <= 1.0, f"{section}.min_lr_ratio", "must be in [0, 1]")
        require(self.warmup_steps >= 0 and (self.max_steps == 0 or self.warmup_steps < self.max_steps),
                f"{section}.warmup_steps", "must be in [0, max_steps)")
        require(self.ngram_order >= 2, f"{section}.ngram_order", "must be at least 2")
        require(0.0 < self.ngram_discount <= 1.0, f"{section}.ngram_discount", "must be in (0, 1]")
        require(self.threads >= 0, f"{section}.threads", "must be 0 (all cores) or more")


def learning_rate_at(step: int, config: PretrainConfig) -> float:
    """Linear warmup to the peak over `warmup_steps`, then cosine decay to `min_lr_ratio` of it."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress_ = (step - config.warmup_steps) / max(1, config.max_steps - 1 - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress_, 1.0)))
    return config.learning_rate * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


class PackedWindows:
    """Windows of `length + 1` tokens (inputs and shifted targets), an endless sequence across epochs."""

    def __init__(self, stream: Stream, length: int, seed: int):
        if len(stream) < length + 1:
            raise ValueError(f"the train text has {len(stream)} tokens, fewer than one window of {length + 1}")
        self.stream, self.length, self.seed = stream, length, seed
        self._epochs: list[torch.Tensor] = []  # starts of each epoch's windows, in training order
        self._ends: list[int] = []             # cumulative window count at the end of each epoch

    def _epoch_starts(self, epoch: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        offset = int(torch.randint(self.length, (1,), generator=generator)) if epoch else 0
        starts = torch.arange(offset, len(self.stream) - self.length, self.length)
        return starts[torch.randperm(len(starts), generator=generator)]

    def start(self, position: int) -> int:
        while not self._ends or position >= self._ends[-1]:
            starts = self._epoch_starts(len(self._epochs))
            self._epochs.append(starts)
            self._ends.append((self._ends[-1] if self._ends else 0) + len(starts))
        epoch = next(i for i, end in enumerate(self._ends) if position < end)
        return int(self._epochs[epoch][position - (self._ends[epoch] - len(self._epochs[epoch]))])

    def batch(self, positions: range) -> tuple[torch.Tensor, torch.Tensor]:
        windows = torch.stack([self.stream[s:s + self.length + 1] for s in map(self.start, positions)])
        return windows[:, :-1], windows[:, 1:]

    def epochs_at(self, position: int) -> float:
        self.start(position)
        epoch = next(i for i, end in enumerate(self._ends) if position < end)
        done = self._ends[epoch] - len(self._epochs[epoch])
        return epoch + (position - done) / len(self._epochs[epoch])


def token_loss(model, inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over the targets that are not IGNORE_INDEX, summed in fp32.

    The per-token losses come straight from the logits' dtype: torch's log-softmax accumulates in fp32
    internally, and upcasting bf16 logits first made the loss 3x slower (~12% of a CPU step) for gradients
    that differ by ~1e-7 (docs/pretraining.md)."""
    logits = model(input_ids=inputs).logits
    losses = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                             reduction="none").float()
    total = losses.sum()
    if reduction == "sum":
        return total
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def make_optimizer(model, config: PretrainConfig) -> torch.optim.Optimizer:
    """AdamW; matrices decay, norms do not. The fused kernel where torch has one for the device."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": config.weight_decay}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=(config.beta1, config.beta2), fused=True)


class MasterWeights:
    """fp32 master copies of a bf16 compute model's weights: backward fills the bf16 gradients, the
    optimizer steps the masters, and the masters are copied back. The compute model needs no autocast,
    whose per-step weight casts were 7–12% of a CPU step (docs/pretraining.md)."""

    def __init__(self, master_model, compute_model):
        self.pairs = list(zip(master_model.parameters(), compute_model.parameters()))
        self.masters = [master for master, _ in self.pairs]

    def gradients_to_masters(self) -> None:
        for master, weight in self.pairs:
            master.grad = None if weight.grad is None else weight.grad.float()
            weight.grad = None

    @torch.no_grad()
    def masters_to_weights(self) -> None:
        for master, weight in self.pairs:
            weight.copy_(master)


def compute_model(model, config: PretrainConfig, device, dtype):
    """(the model that runs forward/backward, its MasterWeights or None, the autocast dtype it needs)."""
    bf16_weights = config.weights == "bf16" or (
        config.weights == "auto" and device.type == "cpu" and dtype == torch.bfloat16)
    if not bf16_weights:
        return model, None, dtype
    compute = copy.deepcopy(model).to(torch.bfloat16)
    return compute, MasterWeights(model, compute), None


def optimizer_step(accelerator, model, optimizer, micro_batches, dtype, max_grad_norm: float,
                   master: MasterWeights | None = None) -> torch.Tensor:
    """One optimizer step over `micro_batches` [(inputs, targets)], accumulated; returns their mean loss.
    With `master`, `model` is the bf16 compute model and `optimizer` steps the fp32 masters."""
    device = accelerator.device
    losses = []
    for inputs, targets in micro_batches:
        with accelerator.accumulate(model):
            with autocast(device, dtype):
                loss = token_loss(model, inputs.to(device), targets.to(device))
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                if master is not None:
                    master.gradients_to_masters()
                if max_grad_norm > 0:
                    accelerator.clip_grad_norm_(master.masters if master else model.parameters(), max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if master is not None and accelerator.sync_gradients:
                master.masters_to_weights()
        losses.append(loss.detach())
    return torch.stack(losses).mean()


# ---------------------------------------------------------------------------------------------- checkpoints

def save_checkpoint(checkpoints: Checkpoints, step: int, model, optimizer, state: dict) -> None:
    """Weights (safetensors), optimizer state and RNG states into checkpoint `step`, committed atomically; `state`
    (window position, train seconds) goes into its state file."""
    from safetensors.torch import save_file, save_model

    folder = checkpoints.staging(step)
    save_model(model, str(folder / "model.safetensors"))
    torch.save(optimizer.state_dict(), folder / "optimizer.pt")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda_{index}": value for index, value in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(folder / "rng.safetensors"))
    checkpoints.commit(folder, step, state)


def load_checkpoint(folder: Path, model, optimizer) -> dict:
    """Restore what `save_checkpoint` wrote; returns the checkpoint's state."""
    from safetensors.torch import load_file, load_model

    load_model(model, str(folder / "model.safetensors"))
    optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    cuda = [rng[f"cuda_{index}"] for index in range(len(rng) - 1)]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return Checkpoints.state(folder)


# --------------------------------------------------------------------------------------------------- loop

@dataclass
class PretrainResult:
    model: object
    val_nats: float
    val_tokens: int
    tokens_seen: int
    train_seconds: float
    tokens_per_second: float
    resumed_from_step: int
    last_train_loss: float


def pretrain(model, tokenizer, train_stream: Stream, val_stream: Stream, config: PretrainConfig,
             context_length: int, checkpoints: Checkpoints, resume_from: Path | None = None,
             live=None) -> PretrainResult:
    """Train `model` for `config.max_steps` optimizer steps (from checkpoint `resume_from` when given),
    checkpointing into `checkpoints`; `live` is a dvclive Live of the main process."""
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps)
    device, main = accelerator.device, accelerator.is_main_process
    # Our own autocast, not accelerate's mixed precision: on GPUs it runs inside accelerate's accumulation; on
    # CPU the default computes in bf16 weights instead (compute_model) and evaluation autocasts the fp32 masters.
    dtype = autocast_dtype(device, config.precision)
    model.to(device)
    model.set_attn_implementation(training_attention(device, config.attention))
    optimizer = make_optimizer(model, config)

    start_step, elapsed_before = 0, 0.0
    if resume_from is not None:
        state = load_checkpoint(resume_from, model, optimizer)  # `Checkpoints.resumable` has logged it
        start_step, elapsed_before = state["step"], state["train_seconds"]
    raw_model = model
    compute, master, compute_dtype = compute_model(model, config, device, dtype)
    if main and master is not None:
        log(STAGE, f"precision: bf16 weights for forward/backward on {device}, fp32 master copies for the optimizer")
    elif main:
        describe_precision(STAGE, device, dtype)
    compute, optimizer = accelerator.prepare(compute, optimizer)
    compute.train()

    windows = PackedWindows(train_stream, context_length, config.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    windows_per_step = config.batch_size * config.gradient_accumulation_steps * world
    tokens_per_step = windows_per_step * context_length

    def validate() -> tuple[float, int]:
        return evaluate_nats(raw_model, val_stream, context_length, config.batch_size, device, dtype)

    final_val = None  # the last step's validation, reused as the result (a resumed finished run has none)
    loss_value, train_start = float("nan"), time.perf_counter()
    with progress() as bar:
        task = bar.add_task(STAGE, total=config.max_steps, completed=start_step, info="", visible=main)
        for step in range(start_step, config.max_steps):
            step_start = time.perf_counter()
            lr = learning_rate_at(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro_batches = [
                windows.batch(range(first, first + config.batch_size))
                for micro in range(config.gradient_accumulation_steps)
                for first in [step * windows_per_step + (micro * world + rank) * config.batch_size]
            ]
            loss = optimizer_step(accelerator, compute, optimizer, micro_batches, compute_dtype, config.max_grad_norm,
                                  master)
            loss_value = float(accelerator.reduce(loss, reduction="mean"))
            tokens_per_second = tokens_per_step / (time.perf_counter() - step_start)
            done = step + 1
            evaluated = validate() if done % config.eval_steps == 0 or done == config.max_steps else None
            val_loss = evaluated[0] / evaluated[1] if evaluated else None
            if done == config.max_steps:
                final_val = evaluated
            if main:
                bar.update(task, completed=done,
                           info=f"loss {loss_value:.3f} · {tokens_per_second:,.0f} tok/s"
                                + (f" · val {val_loss:.3f}" if val_loss is not None else ""))
                if live is not None:
                    live.step = done
                    live.log_metric("train/loss", loss_value)
                    live.log_metric("lr", lr)
                    live.log_metric("tokens_per_second", tokens_per_second)
                    if val_loss is not None:
                        live.log_metric("val/loss", val_loss)
                    live.next_step()
            if done % config.checkpoint_every == 0 and done < config.max_steps:
                if main:
                    save_checkpoint(checkpoints, done, raw_model, optimizer, {
                        "window_position": done * windows_per_step,
                        "train_seconds": elapsed_before + time.perf_counter() - train_start,
                    })
                accelerator.wait_for_everyone()

    train_seconds = elapsed_before + time.perf_counter() - train_start
    raw_model.set_attn_implementation("sdpa")
    val_nats, val_tokens = final_val or validate()
    tokens_seen = config.max_steps * tokens_per_step
    if main and config.max_steps:
        log(STAGE, f"trained {config.max_steps} steps ({tokens_seen:,} tokens, "
                   f"{windows.epochs_at(config.max_steps * windows_per_step - 1):.1f} epochs) in {train_seconds:.0f}s")
    return PretrainResult(
        model=raw_model, val_nats=val_nats, val_tokens=val_tokens, tokens_seen=tokens_seen,
        train_seconds=train_seconds,
        tokens_per_second=(config.max_steps - start_step) * tokens_per_step / max(time.perf_counter() - train_start, 1e-9),
        resumed_from_step=start_step, last_train_loss=loss_value,
    )


# --------------------------------------------------------------------------------------------------- stage

def ngram_baseline(config: PretrainConfig, tokenizer, train_stream, val_stream, val_bytes: int) -> tuple[float, float]:
    """(val bits per byte, seconds) of a Kneser-Ney n-gram fitted on the train stream: the bar the model must clear."""
    start = time.perf_counter()
    ngram = KneserNeyLM(config.ngram_order, len(tokenizer), tokenizer.eos_token_id, config.ngram_discount)
    ngram.fit(train_stream.records())
    nats = sum(ngram.record_nats(tokens)[0] for tokens in val_stream.records())
    return bits_per_byte(nats, val_bytes), time.perf_counter() - start


def train_base(model_config, config: PretrainConfig, tokenizer_dir: Path, tokens_dir: Path, init_dir: Path,
               output_dir: Path, live_dir: Path, checkpoint_dir: Path) -> dict | None:
    """The pretrain stage: the start (`model_config.init`, saved to `init_dir`) trained on the token shards in
    `tokens_dir` (resuming from a checkpoint in `checkpoint_dir` made from the same params and data), saved to
    `output_dir`, and compared with a Kneser-Ney n-gram; returns the report on the main process, None on others."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    start = time.perf_counter()
    if is_scratch(model_config.init) and config.max_steps == 0:
        raise ChatforgeError("params.yaml: pretrain.max_steps=0 leaves a model.init=scratch model untrained; "
                             "set it to at least 1, or start from a pretrained model.init")
    start_stage(config.seed, config.threads)
    is_main = PartialState().is_main_process

    tokenizer = load_tokenizer(tokenizer_dir)
    manifest, train_stream, val_stream = open_splits(tokens_dir)
    check_tokenizer(manifest, tokenizer_dir / "tokenizer.json", tokens_dir)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    val_bytes = val["bytes"]
    log(STAGE, f"read {tokens_dir}/: {train['texts']:,} train texts ({len(train_stream):,} tokens) and "
               f"{val['texts']:,} val texts ({len(val_stream):,} tokens, {val_bytes:,} bytes)")

    # The n-gram baseline first, freed before the model trains: its count tables are most of the stage's memory.
    ngram_bpb, ngram_seconds = ngram_baseline(config, tokenizer, train_stream, val_stream, val_bytes) if is_main else (
        None, None)
    release_freed_memory()

    if is_scratch(model_config.init):
        model = build_model(model_config, tokenizer, config.seed)
    else:
        model = load_initial_model(model_config, tokenizer)
    if is_main:  # the start as the pipeline sees it (our tokenizer, its embeddings), evaluated as `init`
        save_model(init_dir, model, tokenizer)
    parameters = count_parameters(model)
    shape = model.config
    log(STAGE, f"model ({model_config.init}): {shape.num_hidden_layers} layers, width {shape.hidden_size}, "
               f"{shape.num_attention_heads} heads, MLP {shape.intermediate_size}, "
               f"training context {model_config.context_length}: {parameters / 1e6:.2f}M parameters")

    # The manifest names the tokenizer's hash and every part's sha256: it stands for the data.
    checkpoints = Checkpoints(Path(checkpoint_dir), STAGE, {
        "params": {"model": dataclasses.asdict(model_config), "pretrain": dataclasses.asdict(config)},
        "inputs": {"tokens": digest(Path(tokens_dir) / MANIFEST)},
    }, section="")
    # The main process picks the checkpoint (and clears stale ones); the others follow its choice.
    resume_from = broadcast_object_list([checkpoints.resumable() if is_main else None])[0]
    resumed_step = Checkpoints.state(resume_from)["step"] if resume_from else None
    live = open_live(live_dir, resumed_step) if is_main else None  # the killed run's rows past it go
    result = pretrain(model, tokenizer, train_stream, val_stream, config, model_config.context_length,
                      checkpoints, resume_from=resume_from, live=live)
    if live is not None:
        live.end()
    if not is_main:
        return None

    save_model(output_dir, result.model, tokenizer)
    checkpoints.complete(config.max_steps)

    val_loss = result.val_nats / result.val_tokens
    val_bpb = bits_per_byte(result.val_nats, val_bytes)
    return {
        "val_loss": round(val_loss, 4),
        "val_perplexity": round(math.exp(val_loss), 3),
        "val_bits_per_byte": round(val_bpb, 4),
        "ngram_val_bits_per_byte": round(ngram_bpb, 4),
        "beats_ngram": val_bpb < ngram_bpb,
        "ngram_order": config.ngram_order,
        "ngram_seconds": round(ngram_seconds, 2),
        "final_train_loss": round(result.last_train_loss, 4),
        "tokens_seen": result.tokens_seen,
        "tokens_per_second": round(result.tokens_per_second, 1),
        "parameters": parameters,
        "init": model_config.init,
        "train_seconds": round(result.train_seconds, 1),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "resumed_from_step": result.resumed_from_step,
        "train_tokens": len(train_stream),
        "val_tokens": result.val_tokens,
        "val_bytes": val_bytes,
    }
