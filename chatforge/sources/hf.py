"""Any dataset `datasets.load_dataset` can open, with a column mapping.

`dataset` is a hub name, a local folder, or a builder such as json/csv/parquet/text with
`data_files`. Columns map to records:
- `messages_column` (a list of {role, content} or ShareGPT {from, value}) → conversations;
- `prompt_column` + `response_column` (strings) → conversations; with `input_column` (Alpaca's `input`) the
  input follows the prompt after a blank line, as Alpaca's template lays them out (jsonl.alpaca_prompt);
- `prompt_column` + `chosen_column` + `rejected_column` (strings or turn lists) → preferences;
- `text_column` → documents.
Only local files and the local cache are read when HF_HUB_OFFLINE=1 is set (the tests do); remote
code is never run (datasets 4+ dropped dataset scripts).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from chatforge.conversation import InvalidRecord, conversation, document, preference, turn
from chatforge.errors import ChatforgeError
from chatforge.files import SkipLog
from chatforge.params import require
from chatforge.sources.common import Item, SourceConfig, require_paths
from chatforge.sources.jsonl import alpaca_prompt, message_turns, side_turns

# Builders whose data_files are local files, checked before the run.
LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}


@dataclass
class Config(SourceConfig):
    dataset: str = ""  # hub name, local folder, or builder (json, csv, parquet, text)
    subset: str | None = None  # the dataset's config name
    split: str = "train"
    data_files: str | list[str] | None = None  # local files for a builder; globs allowed
    revision: str | None = None  # pin a hub dataset's commit for reproducibility
    cache_dir: str | None = None  # default: the datasets cache (~/.cache/huggingface/datasets)
    max_rows: int | None = None  # read only the first rows
    messages_column: str | None = None
    prompt_column: str | None = None
    response_column: str | None = None
    input_column: str | None = None  # Alpaca's `input`, appended to the prompt (with prompt + response columns)
    chosen_column: str | None = None
    rejected_column: str | None = None
    text_column: str | None = None

    def validate(self, section: str) -> None:
        super().validate(section)
        require(bool(self.dataset), f"{section}.dataset", "is empty; name a hub dataset, a folder or a builder (json)")
        if self.data_files is not None and self.dataset in LOCAL_BUILDERS:  # for a hub dataset they are remote
            require_paths(self.data_files, f"{section}.data_files")
        modes = [bool(self.messages_column), bool(self.text_column), bool(self.prompt_column and self.response_column),
                 bool(self.prompt_column and self.chosen_column and self.rejected_column)]
        require(sum(modes) == 1, section, "needs exactly one column mapping: messages_column, text_column, "
                "prompt_column + response_column, or prompt_column + chosen_column + rejected_column")
        require(self.max_rows is None or self.max_rows > 0, f"{section}.max_rows", "must be positive")
        require(not self.input_column or bool(self.prompt_column and self.response_column), f"{section}.input_column",
                "needs prompt_column and response_column (Alpaca: instruction, output)")

    def columns(self) -> list[str]:
        names = (self.messages_column, self.prompt_column, self.response_column, self.input_column, self.chosen_column,
                 self.rejected_column, self.text_column)
        return [name for name in names if name]


def _string(value, column: str) -> str:
    if not isinstance(value, str):
        raise InvalidRecord("non_string_content", f"{column} is {type(value).__name__}")
    return value


def row_record(config: Config, row: dict, record_id: str, meta: dict) -> dict:
    if config.text_column:
        return document(record_id, config.name, _string(row[config.text_column], config.text_column), meta)
    if config.messages_column:
        return conversation(record_id, config.name, message_turns(row[config.messages_column], config.messages_column), meta)
    prompt = row[config.prompt_column]
    if config.response_column:
        user = _string(prompt, config.prompt_column)
        if config.input_column:
            user = alpaca_prompt(user, row[config.input_column])
        return conversation(record_id, config.name, [turn("user", user),
                                                     turn("assistant", _string(row[config.response_column],
                                                                               config.response_column))], meta)
    return preference(record_id, config.name, side_turns(prompt, config.prompt_column, "user"),
                      side_turns(row[config.chosen_column], config.chosen_column, "assistant"),
                      side_turns(row[config.rejected_column], config.rejected_column, "assistant"), meta)


def open_dataset(config: Config):
    import datasets

    try:
        return datasets.load_dataset(config.dataset, config.subset, split=config.split, data_files=config.data_files,
                                     revision=config.revision, cache_dir=config.cache_dir)
    except Exception as error:  # the library raises a dozen types; each is a problem with the request
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ChatforgeError(f"cannot load dataset {config.dataset!r} (split {config.split!r}): {detail}; check "
                             f"dataset/subset/split/data_files (offline, only local files and the cache are read)") from None


def load(config: Config, skips: SkipLog) -> Iterator[Item]:
    rows = open_dataset(config)
    missing = [column for column in config.columns() if column not in rows.column_names]
    if missing:
        raise ChatforgeError(f"dataset {config.dataset!r} has no column {missing[0]!r}; "
                             f"its columns are {', '.join(rows.column_names)}")
    if config.max_rows is not None:
        rows = rows.select(range(min(config.max_rows, len(rows))))
    for index, row in enumerate(rows):
        where = f"{config.dataset}[{config.split}]:{index}"
        try:
            yield where, row_record(config, row, f"{config.name}:{config.split}:{index}",
                                    {"dataset": config.dataset, "split": config.split, "row": index})
        except InvalidRecord as error:
            skips.skip(error.reason, where, str(error))
