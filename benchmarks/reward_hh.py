"""Reward model (or DPO) on real human rankings: Anthropic HH-RLHF (harmless-base, test part 1, ~1.2k pairs).

The pairs go through the `hh` source (as `collect` would import them) and the preferences split (by a
stable hash of the prompt) into train and test pairs. A reward model is trained from the SFT weights with the
pipeline's own recipe: the `reward` params of params.yaml, with `--profile` laid over them as `chatforge
experiment` does. Whatever the recipe tunes (the probe's L2 by cross-validation) it tunes on the train pairs;
the test pairs are read once, for the accuracy printed next to baselines measured on the same pairs in the
same run: chance, and "the longer / the shorter reply wins". With `--method dpo` the SFT model is trained with
DPO instead (the `dpo` params), and the accuracy is that of its implicit reward β·log π/π_sft (chosen above
rejected) on the same test pairs.

    python benchmarks/reward_hh.py [--method reward|dpo] [--model models/sft] [--profile profiles/smollm2-135m.yaml]
                                   [--train-fraction 0.8]

Figures, and what to expect of them: docs/preferences.md ("Measurements") and docs/dpo.md ("Measured").
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatforge.files import SkipLog  # noqa: E402
from chatforge.params import PARAMS_FILE, load_params, section  # noqa: E402
from chatforge.preferences import OriginConfig, PreferencesConfig, build, tag  # noqa: E402
from chatforge.sources import hh  # noqa: E402
from chatforge.training.dpo import DPOParams, train_dpo  # noqa: E402
from chatforge.stats import wilson_interval  # noqa: E402
from chatforge.noise import merged  # noqa: E402
from chatforge.training.reward import RewardParams, train_reward_model  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "hh-rlhf-harmless-base-test-part1.jsonl.gz"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["reward", "dpo"], default="reward",
                        help="train a reward model, or the SFT model with DPO (its implicit reward is scored)")
    parser.add_argument("--corpus", type=Path, default=CORPUS)
    parser.add_argument("--model", type=Path, default=Path("models/sft"), help="initial weights (a causal LM dir)")
    parser.add_argument("--profile", type=Path, default=None, help="a profile laid over params.yaml")
    parser.add_argument("--train-fraction", type=float, default=0.8)
    args = parser.parse_args()

    skips = SkipLog()
    records = [record for _, record in hh.load(hh.Config(type="hh", name="hh", path=str(args.corpus),
                                                         chosen_conversations=False), skips)]
    pairs = [tag(record, "imported", "hh") for record in records]
    config = PreferencesConfig(val_fraction=1 - args.train_fraction, imported=OriginConfig(),
                               synthetic=dataclasses.replace(PreferencesConfig().synthetic, enabled=False))
    built = build({"imported": pairs}, config)
    train, test = built.splits["train"], built.splits["val"]
    print(f"hh: {len(records)} pairs read ({skips.total} lines skipped {dict(skips.counts)}), "
          f"dropped {built.report['dropped']}; {len(train)} train / {len(test)} held-out pairs, "
          f"split by prompt")

    params_class = RewardParams if args.method == "reward" else DPOParams
    all_params = load_params(PARAMS_FILE)
    if args.profile:
        all_params = merged(all_params, yaml.safe_load(args.profile.read_text()))
    params = section(params_class, args.method, all_params)

    def length_wins(longer: bool) -> float:
        wins = [(len(p["chosen"][0]["content"]) > len(p["rejected"][0]["content"])) == longer for p in test
                if len(p["chosen"][0]["content"]) != len(p["rejected"][0]["content"])]
        return sum(wins) / len(wins)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"{args.method}-hh-") as scratch:
        if args.method == "reward":
            report = train_reward_model(args.model, train, test, params, Path(scratch) / "model", Path(scratch) / "live")
        else:  # the held-out pairs' prompts are the held-out prompts whose samples measure the KL to SFT
            prompts = [{"turns": pair["prompt"]} for pair in test]
            report = train_dpo(args.model, train, test, prompts, params, Path(scratch) / "model", Path(scratch) / "live")
    seconds = time.perf_counter() - start
    what = "reward model" if args.method == "reward" else "DPO implicit reward"
    print(f"{what} from {args.model}: {report['steps']} steps (epochs {params.epochs}, batch {params.batch_size}, "
          f"max_length {params.max_length}, lr {params.learning_rate}, {report['precision']}, "
          f"{training_of(params)}), {seconds:.0f}s")
    if args.method == "dpo":
        print(f"  fitted pairs: train {report['train_pairs']}, held-out {report['val_pairs']}, replies cut "
              f"{report['replies_cut']}; held-out samples: KL to SFT {report['kl_to_sft']:.2f} nats/reply, "
              f"{report['dpo_reply_tokens']:.1f} tokens (SFT {report['sft_reply_tokens']:.1f})")
    if "probe" in report:
        print(f"  probe: L2 {report['probe']['l2']} chosen by cross-validation on the train pairs "
              f"({report['probe']['cv_accuracy']}), train accuracy {report['probe']['train_accuracy']:.3f}")
    n = sum(report['pairs_by_strategy'].values())
    low, high = wilson_interval(round(report["accuracy"] * n), n)
    print(f"test pairwise accuracy: {report['accuracy']:.3f} (n={n}, 95% {low:.3f}-{high:.3f}), "
          f"mean margin {report['mean_margin']:.3f}")
    for name, baseline in (("chance", 0.5), ("longer reply wins", length_wins(True)),
                           ("shorter reply wins", length_wins(False))):
        print(f"  baseline {name:<19} {baseline:.3f}   {what} / baseline = {report['accuracy'] / baseline:.2f}")


def training_of(params) -> str:
    if getattr(params, "freeze_backbone", False):
        return "score head only, backbone frozen"
    return f"LoRA r={params.lora.r}" if params.lora else "full fine-tuning"


if __name__ == "__main__":
    main()
