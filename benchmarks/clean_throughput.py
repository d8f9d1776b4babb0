"""Throughput of the clean engine (conversations per second) with 1 and 2 tasks versus a naive one-task
baseline: langdetect on every conversation's full text and MinHash fed one shingle at a time with `update`
(a fresh MinHash per record). Same data, same run, through datatrove's local executor (chatforge.cleaning.engine).

Data: every conversation of the installed chatterbot-corpus (all languages, with `meta.language` as the
default collect writes them), replicated with variations (typos, case, an appended
turn pair) when --size asks for more, written as a raw shard folder. Prints wall-clock and CPU-time
throughput: on a machine shared with other jobs wall-clock is noisy and extra processes cannot help, CPU
time (parent + task processes) is not.

    python benchmarks/clean_throughput.py [--size N]

Figures: docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chatforge.cleaning.config import CleanConfig  # noqa: E402
from chatforge.cleaning.engine import clean_shards  # noqa: E402
from chatforge.conversation import alternate, conversation  # noqa: E402
from chatforge.params import section  # noqa: E402
from chatforge.shards import ShardWriter  # noqa: E402

KINDS = {"conversation": "conversations", "document": "documents", "preference": "preferences"}


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


def dataset(size: int, root: Path) -> tuple[dict[str, Path], int]:
    """Raw shard folders (kind → folder) under `root` and the number of conversations."""
    rng = random.Random(0)
    base = chatterbot_all()
    size = size or len(base)
    for kind, folder in KINDS.items():
        with ShardWriter(root / folder) as shards:
            for number in range(size if kind == "conversation" else 0):
                language, texts = base[number % len(base)]
                if number >= len(base):
                    texts = variation(texts, rng)
                # meta.language as the chatterbot source writes it (the corpus folder name)
                shards.write(conversation(f"bench:{number}", "chatterbot", alternate(texts), {"language": language}))
    return {kind: root / folder for kind, folder in KINDS.items()}, size


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the executor's task processes)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def measure(inputs: dict[str, Path], size: int, config: CleanConfig, naive: bool) -> tuple[float, float, dict]:
    """(conversations per wall-clock second, per CPU second, report)."""
    from chatforge.cleaning.langid import detect

    detect.cache_clear()  # every run starts cold
    with tempfile.TemporaryDirectory() as out:
        start, start_cpu = time.perf_counter(), cpu_seconds()
        report, _ = clean_shards(inputs, config, Path(out), naive=naive)
        wall, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    return size / wall, size / cpu, report


def engine_config(tasks: int) -> CleanConfig:
    return section(CleanConfig, "clean", {"clean": {"executor": "local", "tasks": tasks, "workers": tasks}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=0, help="conversations (default: the whole corpus)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as raw:
        inputs, size = dataset(args.size, Path(raw))
        print(f"{size} conversations (chatterbot-corpus, all languages, with variations)")

        baseline, baseline_cpu, naive_report = measure(inputs, size, engine_config(1), naive=True)
        print(f"baseline  (naive, 1 task): {baseline:8.1f} conversations/s wall, {baseline_cpu:8.1f} per CPU-second")
        wall = {}
        for tasks in (1, 2):
            wall[tasks], cpu, report = measure(inputs, size, engine_config(tasks), naive=False)
            print(f"engine    tasks={tasks}:        {wall[tasks]:8.1f} conversations/s wall "
                  f"({wall[tasks] / baseline:.2f}x baseline), {cpu:8.1f} per CPU-second ({cpu / baseline_cpu:.2f}x)")
    kept = sum(report["output"]["conversation"].values())
    naive_kept = sum(naive_report["output"]["conversation"].values())
    print(f"kept: engine {kept}, naive baseline {naive_kept} (the baseline trusts langdetect on short text); "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"speedup tasks=2 vs baseline (wall): {wall[2] / baseline:.2f}x (target >= 3x)")


if __name__ == "__main__":
    main()
