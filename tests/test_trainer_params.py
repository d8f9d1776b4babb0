"""The trainer knobs sft, reward and dpo share (training/trainer_params.py): one check, one TrainingArguments
builder, transformers' names, and one line for a key that was renamed."""
from __future__ import annotations

from pathlib import Path

import pytest

from chatforge.errors import ChatforgeError
from chatforge.noise import merged
from chatforge.params import from_dict, load_params, parse_yaml, section
from chatforge.training.dpo import DPOParams
from chatforge.training.pretrain import PretrainConfig
from chatforge.training.reward import RewardParams
from chatforge.training.rl import RLParams
from chatforge.training.sft import SFTParams
from chatforge.training.trainer_params import TrainerParams

ROOT = Path(__file__).resolve().parent.parent
TRAINER_SECTIONS = [(SFTParams, "sft"), (RewardParams, "reward"), (DPOParams, "dpo")]
ALL_SECTIONS = TRAINER_SECTIONS + [(PretrainConfig, "pretrain"), (RLParams, "ppo")]


@pytest.mark.parametrize("cls, name", TRAINER_SECTIONS)
@pytest.mark.parametrize("key, value, message", [
    ("gradient_accumulation_steps", 0, "must be >= 1"),
    ("eval_batch_size", 0, "must be >= 1"),
    ("max_grad_norm", -1.0, "must be >= 0 (0 = no clipping)"),
    ("warmup_steps", 1.5, "must be a share of the steps in [0, 1) or a whole number of steps"),
    ("lr_scheduler", "cosine_please", "must be one of"),
])
def test_the_shared_checks_name_the_sections_key(cls, name, key, value, message):
    assert issubclass(cls, TrainerParams)
    with pytest.raises(ChatforgeError) as error:
        from_dict(cls, {key: value}, name)
    assert str(error.value).startswith(f"params.yaml: {name}.{key} {message}")


def test_a_renamed_key_is_one_line_naming_the_new_one():
    with pytest.raises(ChatforgeError) as error:
        from_dict(SFTParams, {"grad_accumulation": 2}, "sft")
    assert str(error.value) == ("params.yaml: sft.grad_accumulation was renamed to sft.gradient_accumulation_steps; "
                                "rename it")


@pytest.mark.parametrize("cls, name", ALL_SECTIONS)
def test_every_renamed_key_of_every_section_names_its_new_key(cls, name):
    assert cls.RENAMED, f"{name}: no renamed keys"
    for old, new in cls.RENAMED.items():
        assert new in {field for field in cls.__dataclass_fields__}, f"{name}.{new} is not a field"
        with pytest.raises(ChatforgeError, match=rf"^params\.yaml: {name}\.{old} was renamed to {name}\.{new}; "):
            from_dict(cls, {old: 1}, name)


def test_the_shipped_params_and_profile_use_the_new_names():
    params = load_params(ROOT / "params.yaml")
    profile = parse_yaml((ROOT / "profiles/smollm2-135m.yaml").read_text(encoding="utf-8"))
    for values in (params, merged(params, profile)):
        for cls, name in ALL_SECTIONS:
            section(cls, name, values)  # raises on an old (or unknown) key
    assert section(RewardParams, "reward", params).gradient_accumulation_steps == 4
    assert section(SFTParams, "sft", params).gradient_accumulation_steps == 2
    assert section(PretrainConfig, "pretrain", params).eval_steps == 185


@pytest.mark.parametrize("warmup, steps", [(0.05, 5), (0.0, 0), (3, 3)])
def test_warmup_steps_are_read_as_transformers_reads_them(tmp_path, warmup, steps):
    from transformers import TrainingArguments

    args = from_dict(DPOParams, {"warmup_steps": warmup}, "dpo").training_args(
        TrainingArguments, None, output_dir=str(tmp_path))
    assert args.get_warmup_steps(100) == steps  # < 1: a share of the steps; >= 1: steps


def test_the_builder_maps_the_shared_knobs_and_lets_the_stage_add_and_override(tmp_path):
    from transformers import TrainingArguments

    params = from_dict(RewardParams, {"batch_size": 4, "gradient_accumulation_steps": 3, "max_grad_norm": 0.5,
                                      "eval_steps": 7, "eval_batch_size": 5, "max_steps": 0}, "reward")
    args = params.training_args(TrainingArguments, None, output_dir=str(tmp_path), num_train_epochs=1.0,
                                save_strategy="no")
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_grad_norm) == (4, 3, 0.5)
    assert (args.eval_strategy, args.eval_steps, args.per_device_eval_batch_size) == ("steps", 7, 5)
    assert args.num_train_epochs == 1.0 and args.max_steps == -1 and args.save_strategy == "no"
    sft = from_dict(SFTParams, {"eval_steps": 7}, "sft").training_args(TrainingArguments, None,
                                                                       output_dir=str(tmp_path))
    assert sft.eval_strategy == "no" and sft.eval_steps is None  # sft validates by itself


def test_reward_passes_gradient_accumulation_to_its_trainer(tmp_path, monkeypatch):
    import trl

    from chatforge.training import reward

    built = []

    class Recorder:  # RewardTrainer, without the training
        def __init__(self, model, args, **kwargs):
            self.model = model
            built.append(args)

        def remove_callback(self, callback):
            pass

        def train(self, resume_from_checkpoint=None):
            pass

    monkeypatch.setattr(trl, "RewardTrainer", Recorder)
    params = from_dict(RewardParams, {"batch_size": 4, "gradient_accumulation_steps": 4}, "reward")
    reward.train_with_trl("model", None, None, None, params, 1.0, 3, None, None, {}, tmp_path / "live", None)
    (args,) = built
    assert (args.gradient_accumulation_steps, args.per_device_train_batch_size, args.num_train_epochs) == (4, 4, 1.0)
    assert args.train_sampling_strategy == "sequential" and args.eval_strategy == "steps"
