"""Preference pairs for the reward model and DPO, from four origins (see docs/preferences.md).

1. imported: pairs collected from preference sources (the `hh` source, preference JSONL), as cleaned;
2. oasst: pairs of the `oasst` source (OpenAssistant's human rankings), imported the same way but kept apart,
   with their own weight and their own accuracy in the reports;
3. labels: human judgements written by `chatforge label` into `data/labels/*.jsonl`;
4. synthetic: for every prefix of a clean conversation that ends in a user turn, the real assistant
   reply is chosen and a corrupted or foreign reply is rejected.

Every pair is `{"id", "source", "prompt", "chosen", "rejected", "meta": {"origin", "strategy"}}`
(trl's conversational preference format with an explicit prompt). Pairs are split by a stable hash of
the prompt, so one prompt never lands in both splits. An origin's `weight` repeats its pairs in the
train split (2.0 = twice, 0.5 = a seeded half); the val split keeps every pair once, so evaluation
measures all origins whatever their training weight.
"""
from __future__ import annotations

import json
import math
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from chatforge.conversation import InvalidRecord, check_preference, preference, split_of
from chatforge.console import progress
from chatforge.errors import ChatforgeError
from chatforge.files import SkipLog, iter_jsonl
from chatforge.params import require

ORIGINS = ("imported", "oasst", "labels", "synthetic")
# Imported pairs whose meta.format names a source of human rankings kept as its own origin.
ORIGIN_OF_FORMAT = {"oasst": "oasst"}
IMPORTED_ORIGINS = ("imported", "oasst")  # both read from data/clean/preferences.jsonl
STRATEGIES = ("other_reply", "truncated", "shuffled", "repetition", "sft_sample")
# Judgements of `chatforge label` that record an item as seen but yield no pair.
NO_PAIR_JUDGEMENTS = ("tie", "skip")


@dataclass
class OriginConfig:
    enabled: bool = True
    weight: float = 1.0  # repeats of each pair in the train split; 0 = evaluated on, not trained on

    def validate(self, section: str) -> None:
        require(self.weight >= 0, f"{section}.weight", "must be >= 0")


@dataclass
class StrategyWeights:
    """Relative chance of each way to build a rejected reply; 0 turns a strategy off."""

    other_reply: float = 1.0  # a real reply to another prompt: fluent but off-topic
    truncated: float = 1.0  # the real reply cut short
    shuffled: float = 1.0  # the real reply's words in random order
    repetition: float = 1.0  # a phrase of the reply repeated, as a looping model does
    sft_sample: float = 0.0  # a reply sampled from models/sft (needs that model as a stage dependency)

    def validate(self, section: str) -> None:
        for name in STRATEGIES:
            require(getattr(self, name) >= 0, f"{section}.{name}", "must be >= 0")
        require(any(getattr(self, name) > 0 for name in STRATEGIES), section, "needs one weight > 0")


@dataclass
class SyntheticConfig(OriginConfig):
    rejections_per_prompt: int = 1  # distinct strategies applied to each prefix
    strategies: StrategyWeights = field(default_factory=StrategyWeights)
    truncate_keep: list[float] = field(default_factory=lambda: [0.2, 0.6])  # share of words kept
    repetition_min_repeats: int = 4
    min_words_to_reorder: int = 4  # truncated/shuffled need a reply at least this long
    sft_batch_size: int = 16
    sft_sampling: dict = field(default_factory=dict)  # a `generate`-style section for sft_sample

    def validate(self, section: str) -> None:
        super().validate(section)
        require(self.rejections_per_prompt >= 1, f"{section}.rejections_per_prompt", "must be >= 1")
        low, high = (self.truncate_keep + [None, None])[:2]
        require(len(self.truncate_keep) == 2 and 0 < low <= high < 1, f"{section}.truncate_keep",
                "must be [low, high] with 0 < low <= high < 1")
        require(self.repetition_min_repeats >= 2, f"{section}.repetition_min_repeats", "must be >= 2")
        require(self.min_words_to_reorder >= 2, f"{section}.min_words_to_reorder", "must be >= 2")


@dataclass
class PreferencesConfig:
    seed: int = 0
    val_fraction: float = 0.1
    imported: OriginConfig = field(default_factory=OriginConfig)
    oasst: OriginConfig = field(default_factory=OriginConfig)
    labels: OriginConfig = field(default_factory=OriginConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    label_k: int = 4  # replies per item in `chatforge label --mode ranking`

    def validate(self, section: str) -> None:
        require(0 < self.val_fraction < 1, f"{section}.val_fraction", "must be between 0 and 1")
        require(self.label_k >= 2, f"{section}.label_k", "must be >= 2")


def prompt_key(prompt: list[dict]) -> str:
    return json.dumps(prompt, ensure_ascii=False, sort_keys=True)


def pair_key(record: dict) -> str:
    return json.dumps([record["prompt"], record["chosen"], record["rejected"]], ensure_ascii=False, sort_keys=True)


def has_empty_reply(record: dict) -> bool:
    return any(not turn["content"].strip() for turn in record["chosen"] + record["rejected"])


def has_empty_prompt(record: dict) -> bool:
    """The user message the replies answer is blank (the pair says nothing about answering anything)."""
    return not record["prompt"][-1]["content"].strip()


def is_web_self_comparison(meta: dict) -> bool:
    """A web A/B label of a model against itself, which `chatforge serve` wrote before it refused them. (A
    `chatforge label` pair of two samples of one model is that labeller's design, and stays.)"""
    models = meta.get("models")
    return meta.get("mode") == "web" and isinstance(models, dict) and models.get("chosen") == models.get("rejected")


def tag(record: dict, origin: str, strategy: str) -> dict:
    """The record as an output pair, with its origin and strategy in meta (other meta dropped)."""
    return preference(record.get("id"), record.get("source", origin), record.get("prompt"), record.get("chosen"),
                      record.get("rejected"), meta={"origin": origin, "strategy": strategy})


# ---------------------------------------------------------------- imported pairs and human labels

def imported_origin_and_strategy(record: dict) -> tuple[str, str]:
    """`oasst` pairs (by meta.format) with their ranks as the strategy (`rank0>rank2`), so reports show how
    agreement grows with the rank gap; other imported pairs with their source (e.g. `hh`)."""
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    origin = ORIGIN_OF_FORMAT.get(meta.get("format"), "imported")
    if origin == "oasst":
        return origin, f"rank{meta.get('chosen_rank')}>rank{meta.get('rejected_rank')}"
    return origin, str(record.get("source", "unknown"))


def read_imported(path: Path, skips: SkipLog) -> Iterator[dict]:
    """Cleaned imported pairs, each tagged with its origin (`imported` or `oasst`) and strategy."""
    if not path.exists():
        raise ChatforgeError(f"{path}: not found; run `dvc repro clean` (or set preferences.imported.enabled and "
                             "preferences.oasst.enabled to false)")
    for _, record in iter_jsonl(path, skips):
        yield tag(record, *imported_origin_and_strategy(record))


def read_labels(folder: Path, skips: SkipLog, judgements: Counter) -> Iterator[dict]:
    """Pairs from `chatforge label` and web A/B files; ties and skips are counted in `judgements`, not paired; a
    web comparison of a model with itself is skipped as `label_web_same_model`."""
    for path in sorted(folder.glob("*.jsonl")) if folder.exists() else []:
        for lineno, record in iter_jsonl(path, skips):
            meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
            judgement = meta.get("judgement", "prefer")
            judgements[judgement] += 1
            if judgement in NO_PAIR_JUDGEMENTS:
                continue
            if "chosen" not in record or "rejected" not in record:
                skips.skip("label_without_pair", f"{path}:{lineno}", f"judgement={judgement!r}")
                continue
            if is_web_self_comparison(meta):
                skips.skip("label_web_same_model", f"{path}:{lineno}", f"model {meta['models']['chosen']!r} twice")
                continue
            yield tag(record, "labels", str(meta.get("mode", "unknown")))


# ---------------------------------------------------------------- synthetic pairs

@dataclass
class Prefix:
    id: str  # conversation id + index of the reply
    prompt: list[dict]  # ends in a user turn
    reply: dict  # the real assistant turn that followed


def prefixes(conversations: Iterable[dict]) -> Iterator[Prefix]:
    """Every (prompt, real reply) of the conversations: a user turn followed by an assistant turn."""
    for record in conversations:
        turns = record["turns"]
        for index in range(1, len(turns)):
            if turns[index]["role"] == "assistant" and turns[index - 1]["role"] == "user":
                yield Prefix(f"{record['id']}#{index}", turns[:index], turns[index])


class Rejecter:
    """Builds rejected replies for prefixes with weighted strategies, deterministically per prefix."""

    def __init__(self, config: SyntheticConfig, seed: int, all_prefixes: list[Prefix]):
        self.config = config
        self.seed = seed
        self.replies = sorted({p.reply["content"] for p in all_prefixes})
        # Real replies to the same prompt are good answers too: never use one as a rejection.
        self.good = defaultdict(set)
        for p in all_prefixes:
            self.good[prompt_key(p.prompt)].add(p.reply["content"])

    def rng(self, prefix: Prefix, salt: str = "") -> random.Random:
        return random.Random(f"{self.seed}:{prefix.id}:{salt}")  # str seeds are stable across runs

    def strategies_for(self, prefix: Prefix) -> list[str]:
        """Up to `rejections_per_prompt` distinct applicable strategies, drawn by weight."""
        words = len(prefix.reply["content"].split())
        weights = {name: getattr(self.config.strategies, name) for name in STRATEGIES}
        if words < self.config.min_words_to_reorder:
            weights["truncated"] = weights["shuffled"] = 0.0
        if words == 0:
            weights["repetition"] = 0.0
        rng, chosen = self.rng(prefix, "strategies"), []
        while len(chosen) < self.config.rejections_per_prompt:
            names = [name for name, weight in weights.items() if weight > 0 and name not in chosen]
            if not names:
                break
            chosen.append(rng.choices(names, weights=[weights[n] for n in names])[0])
        return chosen

    def reject(self, prefix: Prefix, strategy: str) -> str:
        """A rejected reply text for one of the text strategies ('' when none could be built)."""
        rng = self.rng(prefix, strategy)
        words = prefix.reply["content"].split()
        if strategy == "other_reply":
            good = self.good[prompt_key(prefix.prompt)]
            for _ in range(20):
                text = rng.choice(self.replies)
                if text not in good:
                    return text
            return ""
        if strategy == "truncated":
            low, high = self.config.truncate_keep
            keep = min(len(words) - 1, max(1, round(len(words) * rng.uniform(low, high))))
            return " ".join(words[:keep])
        if strategy == "shuffled":
            for _ in range(10):
                shuffled = words[:]
                rng.shuffle(shuffled)
                if shuffled != words:
                    return " ".join(shuffled)
            return ""
        if strategy == "repetition":
            phrase = words[: rng.randint(1, min(3, len(words)))]
            repeats = max(self.config.repetition_min_repeats, math.ceil(len(words) / len(phrase)))
            return " ".join(phrase * repeats)
        raise ValueError(strategy)


SftSampler = Callable[[list[list[dict]]], list[str]]


def synthetic_pairs(conversations: list[dict], config: SyntheticConfig, seed: int,
                    sft_sampler: SftSampler | None = None) -> tuple[list[dict], int]:
    """Synthetic pairs of the conversations and the number of prefixes they came from.

    `sft_sampler` maps prompts to sampled reply texts; required when the `sft_sample` weight is > 0.
    """
    all_prefixes = list(prefixes(conversations))
    rejecter = Rejecter(config, seed, all_prefixes)
    pairs, sft_wanted = [], []
    for prefix in all_prefixes:
        for strategy in rejecter.strategies_for(prefix):
            if strategy == "sft_sample":
                sft_wanted.append(prefix)
                continue
            pairs.append(synthetic_pair(prefix, strategy, rejecter.reject(prefix, strategy)))
    if sft_wanted:
        if sft_sampler is None:
            raise ChatforgeError("params.yaml: preferences.synthetic.strategies.sft_sample > 0 needs the SFT model")
        samples = sft_sampler([p.prompt for p in sft_wanted])
        pairs += [synthetic_pair(p, "sft_sample", text) for p, text in zip(sft_wanted, samples)]
    return pairs, len(all_prefixes)


def synthetic_pair(prefix: Prefix, strategy: str, rejected_text: str) -> dict:
    return preference(f"{prefix.id}:{strategy}", "synthetic", prefix.prompt, [prefix.reply],
                      [{"role": "assistant", "content": rejected_text}],
                      meta={"origin": "synthetic", "strategy": strategy})


# ---------------------------------------------------------------- validation, dedup, split, weights

@dataclass
class Built:
    splits: dict[str, list[dict]]
    report: dict


def build(pairs_by_origin: dict[str, Iterable[dict]], config: PreferencesConfig) -> Built:
    """Validate, dedup, split by prompt hash and weight the pairs of each enabled origin."""
    fractions = {"train": 1.0 - config.val_fraction, "val": config.val_fraction}
    splits: dict[str, list[dict]] = {"train": [], "val": []}
    seen: set[str] = set()
    read, duplicates, invalid = Counter(), Counter(), Counter()
    for origin, pairs in pairs_by_origin.items():
        for record in pairs:
            read[origin] += 1
            try:
                check_preference(record)
                if has_empty_reply(record):
                    raise InvalidRecord("empty_reply")
                if has_empty_prompt(record):
                    raise InvalidRecord("empty_prompt")
            except InvalidRecord as error:
                invalid[f"{origin}/{error.reason}"] += 1
                continue
            key = pair_key(record)
            if key in seen:
                duplicates[origin] += 1
                continue
            seen.add(key)
            splits[split_of(prompt_key(record["prompt"]), fractions)].append(record)
    splits["train"] = weighted(splits["train"], config, config.seed)
    return Built(splits, {
        "read": dict(read),
        "dropped": {"duplicates": dict(duplicates), "invalid": dict(sorted(invalid.items()))},
        "weights": {origin: getattr(config, origin).weight for origin in pairs_by_origin},
        "pairs": {name: count_pairs(records) for name, records in splits.items()},
    })


def weighted(records: list[dict], config: PreferencesConfig, seed: int) -> list[dict]:
    """Repeat each pair `weight` times: the integer part always, the fraction with a seeded draw."""
    out = []
    for record in records:
        weight = getattr(config, record["meta"]["origin"]).weight
        copies = int(weight) + (random.Random(f"{seed}:weight:{record['id']}").random() < weight - int(weight))
        for copy in range(copies):
            out.append(record if copy == 0 else {**record, "id": f"{record['id']}~{copy}"})
    return out


def count_pairs(records: list[dict]) -> dict:
    origins = Counter(r["meta"]["origin"] for r in records)
    strategies = Counter(f"{r['meta']['origin']}/{r['meta']['strategy']}" for r in records)
    return {
        "total": len(records),
        "prompts": len({prompt_key(r["prompt"]) for r in records}),
        "by_origin": dict(sorted(origins.items())),
        "by_strategy": dict(sorted(strategies.items())),
    }


# ---------------------------------------------------------------- the optional SFT-sample strategy

def make_sft_sampler(model_dir: Path, config: SyntheticConfig, seed: int) -> SftSampler:
    """Sample one reply per prompt from the SFT model, with `synthetic.sft_sampling` (a `generate`-style mapping)."""
    from chatforge.inference.generate import generate_replies
    from chatforge.inference.loading import load_model
    from chatforge.inference.prompting import fit_history, prompt_budget
    from chatforge.inference.sampling import SamplingParams
    from chatforge.params import from_dict

    sampling = from_dict(SamplingParams, config.sft_sampling, "preferences.synthetic.sft_sampling")
    model, tokenizer = load_model(model_dir, stage_hint="sft")
    budget = prompt_budget(model, sampling)

    def sample(prompts: list[list[dict]]) -> list[str]:
        # A prompt too long for the model's context loses its oldest turns (prompting.fit_history); one that
        # cannot fit at all gets an empty sample, which is then dropped as an invalid pair.
        texts = [""] * len(prompts)
        fitting = []
        for index, prompt in enumerate(prompts):
            try:
                fitting.append((index, fit_history(tokenizer, prompt, budget)[0]))
            except ChatforgeError:
                continue
        with progress() as bar:
            task = bar.add_task("sft samples", total=len(fitting), info="")
            for start in range(0, len(fitting), config.sft_batch_size):
                batch = fitting[start:start + config.sft_batch_size]
                replies = generate_replies(model, tokenizer, [messages for _, messages in batch], sampling,
                                           seed=seed + start, batch_size=config.sft_batch_size)
                for (index, _), reply in zip(batch, replies):
                    texts[index] = reply.text.strip()
                bar.advance(task, len(batch))
        return texts

    return sample


def require_stage_dependency(stage: str, path: str, why: str, dvc_file: Path = Path("dvc.yaml")) -> None:
    """DVC has no conditional deps: a knob that makes a stage read `path` needs it declared, or the cache goes stale."""
    import yaml

    if not dvc_file.exists():
        return  # run outside a DVC project (tests, scripts): nothing to keep in sync
    deps = ((yaml.safe_load(dvc_file.read_text(encoding="utf-8")) or {}).get("stages", {}).get(stage) or {}).get("deps", [])
    if path not in deps and path.rstrip("/") not in deps:
        raise ChatforgeError(f"{dvc_file}: stage {stage} must list `- {path}` in its deps when {why}; add it there")
