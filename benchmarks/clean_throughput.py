"""Throughput of the clean pipeline (conversations per second) at num_proc 1 and 2 versus a naive
one-process baseline: langdetect on every conversation's full text and MinHash fed one shingle at a time
with `update` (a fresh MinHash per record). Same data, same run.

Data: every conversation of the installed chatterbot-corpus (all languages, with `meta.language` as the
default collect writes them: 7.6k conversations), replicated with variations (typos, case, an appended
turn pair) when --size asks for more. Prints wall-clock and CPU-time throughput: on a machine shared with
other jobs wall-clock is noisy and extra processes cannot help, CPU time (parent + workers) is not.

    python benchmarks/clean_throughput.py [--size N]
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatforge.cleaning.config import CleanConfig  # noqa: E402
from chatforge.cleaning.pipeline import Item, run_clean  # noqa: E402
from chatforge.conversation import alternate, conversation  # noqa: E402
from chatforge.params import section  # noqa: E402


def chatterbot_all() -> list[tuple[str, list[str]]]:
    import chatterbot_corpus

    root = Path(chatterbot_corpus.__file__).parent / "data"
    found = []
    for path in sorted(root.glob("*/*.yml")):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            continue
        for texts in data.get("conversations") or []:
            if isinstance(texts, list) and len(texts) >= 2:
                found.append((path.parent.name, [str(t) for t in texts]))
    return found


def variation(texts: list[str], rng: random.Random) -> list[str]:
    choice = rng.randrange(3)
    if choice == 0:
        return [t.lower() for t in texts]
    if choice == 1:
        words = texts[-1].split(" ")
        i = rng.randrange(len(words))
        words[i] = words[i][::-1]
        return texts[:-1] + [" ".join(words)]
    return texts + ["Tell me more about that, please.", "There is not much more to say, I am afraid."]


def dataset(size: int) -> list[Item]:
    rng = random.Random(0)
    base = chatterbot_all()
    size = size or len(base)
    records = []
    for number in range(size):
        language, texts = base[number % len(base)]
        if number >= len(base):
            texts = variation(texts, rng)
        # meta.language as the chatterbot source writes it (the corpus folder name)
        records.append(conversation(f"bench:{number}", "chatterbot", alternate(texts), {"language": language}))
    return [Item("conversation", f"bench:{i}", r) for i, r in enumerate(records)]


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def measure(items: list[Item], config: CleanConfig, naive: bool) -> tuple[float, float, dict]:
    """(conversations per wall-clock second, per CPU second, report)."""
    from chatforge.cleaning.langid import detect

    detect.cache_clear()  # every run starts cold
    start, start_cpu = time.perf_counter(), cpu_seconds()
    result = run_clean(items, config, naive=naive)
    wall, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    return len(items) / wall, len(items) / cpu, result.report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=0, help="conversations (default: the whole corpus)")
    args = parser.parse_args()
    items = dataset(args.size)
    print(f"{len(items)} conversations (chatterbot-corpus, all languages, with variations)")

    baseline, baseline_cpu, naive_report = measure(
        items, section(CleanConfig, "clean", {"clean": {"num_proc": 1}}), naive=True)
    print(f"baseline  (naive, 1 process): {baseline:8.1f} conversations/s wall, {baseline_cpu:8.1f} per CPU-second")
    wall = {}
    for num_proc in (1, 2):
        config = section(CleanConfig, "clean", {"clean": {"num_proc": num_proc}})
        wall[num_proc], cpu, report = measure(items, config, naive=False)
        print(f"pipeline  num_proc={num_proc}:         {wall[num_proc]:8.1f} conversations/s wall "
              f"({wall[num_proc] / baseline:.2f}x baseline), {cpu:8.1f} per CPU-second ({cpu / baseline_cpu:.2f}x)")
    kept = sum(report["output"]["conversation"].values())
    naive_kept = sum(naive_report["output"]["conversation"].values())
    print(f"kept: pipeline {kept}, naive baseline {naive_kept} (the baseline trusts langdetect on short text); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"speedup num_proc=2 vs baseline (wall): {wall[2] / baseline:.2f}x (target >= 3x)")

if __name__ == "__main__":
    main()
