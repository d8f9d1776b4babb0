"""The preference pairs the `preferences` stage writes (data/preferences/{train,val}.jsonl), as `reward` and `dpo`
read them: every train pair, and a fixed sample of the val pairs."""
from __future__ import annotations

from pathlib import Path

from chatforge.console import log
from chatforge.corpus import fixed_sample
from chatforge.files import read_jsonl


def read_pairs(folder: Path, max_val_pairs: int | None, stage: str) -> tuple[list[dict], list[dict]]:
    """(train pairs, val pairs) from `folder`: the val pairs are the same fixed sample of at most `max_val_pairs`
    whatever the model (`corpus.fixed_sample`); the stage's log says how many it read and keeps."""
    train_pairs, all_val_pairs = read_jsonl(folder / "train.jsonl"), read_jsonl(folder / "val.jsonl")
    val_pairs = fixed_sample(all_val_pairs, max_val_pairs)
    log(stage, f"read {len(train_pairs)} train and {len(all_val_pairs)} val pairs from {folder}/; validating on "
               f"{len(val_pairs)} of them")
    return train_pairs, val_pairs
