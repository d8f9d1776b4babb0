"""Data stages at dump scale: wall time, records/s and peak memory per stage and dump size.

Generates Pushshift-style Reddit dumps (RS_ submissions and RC_ comments, zstd NDJSON as
chatforge/sources/reddit.py reads them) of each size, then runs each stage in STAGES on each dump
as its own process (`python stages/<stage>.py` in a project folder per size, with this repository's
params.yaml and the dump as the only collect source). For the ratio, the same run measures today's
in-memory build at the smallest size: reddit with `buckets: 1`, every thread held at once, and clean as it
was before datatrove (IN_MEMORY_CLEAN_REV, every record in memory).

The dumps: comment text from an order-2 word Markov chain over the installed chatterbot-corpus
(English) and ALICE AIML replies (offline, varied English); thread sizes heavy-tailed; comments
interleaved in time across threads as in a monthly dump; [deleted]/[removed] and low-score comments;
and whole threads copied with small edits, so that their chains are near-duplicates of the
original's. `near_duplicates.jsonl` beside the dump lists each pair of conversation ids
(`reddit:<top comment id>`), for measuring dedup recall and precision downstream.

Memory: `peak RSS` is the largest process's maximum resident set (getrusage RUSAGE_CHILDREN in a
fresh parent process per run, so earlier runs do not count); `tree peak` is the proportional set size
(PSS: a page shared by n processes counts 1/n in each) summed over the stage's process tree, sampled
every 100 ms: forked workers share the parent's pages, so a sum of their RSS would count those again.
`tree anon` is the same sum of anonymous pages only (Pss_Anon: heap, Python objects, arrays), without pages of
memory-mapped files (clean's signature, shingle and order files), which RSS and PSS count once touched but the
kernel drops under pressure like any page cache: the memory a stage really needs.

    python benchmarks/data_scale.py [--sizes 250000,1000000,4000000] [--work /tmp/chatforge-data-scale]
                                    [--stages collect,clean,tokenizer,tokenize]

A stage is added by writing `run_<stage>(project, dump) -> Row` and listing it in STAGES.

Figures: docs/data-scale.md.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml
import zstandard

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chatforge.collect import CollectConfig, build_sources  # noqa: E402
from chatforge.files import SkipLog  # noqa: E402
from chatforge.params import section  # noqa: E402
from chatforge.shards import iter_records  # noqa: E402

SUBREDDITS = ["AskReddit", "cooking", "books", "science", "movies", "programming", "travel", "gardening"]
DELETED_SHARE, REMOVED_SHARE, LOW_SCORE_SHARE = 0.05, 0.03, 0.10
COPIED_THREAD_SHARE = 0.02  # threads re-posted with small edits: near-duplicate chains
WINDOW_THREADS = 2000  # threads whose comments are interleaved in time (a dump is sorted by time)


# ---------------------------------------------------------------- the dump

class Sentences:
    """New sentences from an order-2 word Markov chain over real conversational English.

    A walk that only repeats one of the seed texts is drawn again: the seed corpora repeat short lines
    thousands of times ("For dinner"), and verbatim lines shared by unrelated comments would make their
    conversations near-duplicates of each other that were never injected, and dedup "precision" on such a dump
    would measure the generator, not dedup (how often walks were seed lines: docs/data-scale.md)."""

    def __init__(self, seed: int, max_draws: int = 20):
        self.rng = random.Random(seed)
        self.max_draws = max_draws
        self.next_words: dict[tuple[str, str], list[str]] = {}
        self.starts: list[tuple[str, str]] = []
        distinct = dict.fromkeys(" ".join(text.split()) for text in seed_texts())
        self.seen = set(distinct)
        for text in distinct:
            words = ["", "", *text.split(), None]
            self.starts.append((words[2], words[3]) if len(words) > 4 else None)
            for first, second, third in zip(words, words[1:], words[2:]):
                self.next_words.setdefault((first, second), []).append(third)
        self.starts = [start for start in self.starts if start]

    def sentence(self, max_words: int = 40) -> str:
        for _ in range(self.max_draws):
            sentence = self.walk(max_words)
            if sentence not in self.seen:
                return sentence
        return sentence

    def walk(self, max_words: int) -> str:
        first, second = self.rng.choice(self.starts)
        words = [first, second]
        while len(words) < max_words:
            following = self.rng.choice(self.next_words.get((first, second), [None]))
            if following is None:
                break
            words.append(following)
            first, second = second, following
        return " ".join(words)

    def text(self) -> str:
        return " ".join(self.sentence() for _ in range(self.rng.choice((1, 1, 1, 2, 2, 3, 4))))


def seed_texts() -> list[str]:
    """Turn texts of the default sources: chatterbot-corpus English and the ALICE AIML replies."""
    texts = []
    for source in build_sources(section(CollectConfig, "collect")):
        for _, record in source.module.load(source.config, SkipLog()):
            if record["meta"].get("language") in ("english", "en"):
                texts.extend(turn["content"] for turn in record["turns"])
    return texts


def edited(text: str, rng: random.Random) -> str:
    """A near-duplicate: one word dropped, doubled or re-cased, or punctuation changed."""
    words = text.split()
    index = rng.randrange(len(words))
    change = rng.randrange(4)
    if change == 0 and len(words) > 3:
        del words[index]
    elif change == 1:
        words.insert(index, words[index])
    elif change == 2:
        words[index] = words[index].upper()
    else:
        words[-1] = words[-1].rstrip(".!?") + rng.choice(["!", "...", " :)", "?"])
    return " ".join(words)


@dataclass
class Dump:
    comments: int
    folder: Path

    @property
    def paths(self) -> list[str]:
        return [str(self.folder / "RS_bench.zst"), str(self.folder / "RC_bench.zst")]

    @property
    def lines(self) -> int:
        return json.loads((self.folder / "summary.json").read_text())["lines"]


def thread_comments(thread: str, size: int, start: int, sentences: Sentences, rng: random.Random) -> list[dict]:
    """A thread's comments: replies to the submission or to an earlier (mostly recent) comment."""
    comments, names = [], []
    for number in range(size):
        parent = f"t3_{thread}" if not names or rng.random() < 0.4 else rng.choice(names[-8:])
        roll = rng.random()
        body = ("[deleted]" if roll < DELETED_SHARE else "[removed]" if roll < DELETED_SHARE + REMOVED_SHARE
                else sentences.text())
        score = rng.randrange(-5, 1) if rng.random() < LOW_SCORE_SHARE else int(rng.paretovariate(1.3))
        comment_id = f"{thread}c{number}"
        comments.append({
            "id": comment_id, "parent_id": parent, "link_id": f"t3_{thread}", "body": body, "score": score,
            "author": "[deleted]" if body == "[deleted]" else f"user{rng.randrange(50_000)}",
            "created_utc": start + number * rng.randrange(5, 600), "subreddit_id": "t5_2qh1i",
            "gilded": 0, "controversiality": int(rng.random() < 0.05), "distinguished": None, "edited": False,
            "stickied": False, "is_submitter": False, "author_flair_text": None, "retrieved_on": start + 86_400,
            "permalink": f"/r/sub/comments/{thread}/_/{comment_id}/"})
        names.append(f"t1_{comment_id}")
    return comments


def copy_thread(submission: dict, comments: list[dict], copy: str, rng: random.Random) -> tuple[dict, list[dict]]:
    """The thread re-posted under new ids, its texts slightly edited: the same chains, near-duplicated."""
    original = submission["id"]

    def renamed(value: str) -> str:
        return value.replace(original, copy, 1)

    new_submission = {**submission, "id": copy, "title": edited(submission["title"], rng),
                      "permalink": renamed(submission["permalink"])}
    new_comments = [{**comment, "id": renamed(comment["id"]), "parent_id": renamed(comment["parent_id"]),
                     "link_id": f"t3_{copy}", "permalink": renamed(comment["permalink"]),
                     "created_utc": comment["created_utc"] + 3600,
                     "body": comment["body"] if comment["body"] in ("[deleted]", "[removed]") or rng.random() < 0.7
                     else edited(comment["body"], rng)} for comment in comments]
    return new_submission, new_comments


def generate(folder: Path, comments: int, seed: int = 0) -> Dump:
    """RS_bench.zst, RC_bench.zst, near_duplicates.jsonl and summary.json in `folder` (kept and reused)."""
    dump = Dump(comments, folder)
    if (folder / "summary.json").exists():
        return dump
    folder.mkdir(parents=True, exist_ok=True)
    rng, sentences = random.Random(seed), Sentences(seed)
    written = {"submissions": 0, "comments": 0, "near_duplicate_pairs": 0}
    # One compressor per stream: a compressor's context serves one stream at a time.
    with zstandard.ZstdCompressor(level=3).stream_writer(open(folder / "RS_bench.zst", "wb")) as rs, \
            zstandard.ZstdCompressor(level=3).stream_writer(open(folder / "RC_bench.zst", "wb")) as rc, \
            open(folder / "near_duplicates.jsonl", "w", encoding="utf-8") as pairs:
        thread_number, clock = 0, 1_546_300_800
        while written["comments"] < comments:
            window, in_window = [], 0  # (submission, comments) of threads active at the same time
            for _ in range(WINDOW_THREADS):
                thread = f"x{thread_number:x}"  # "x": a thread id is never part of "t1_"/"t3_"
                thread_number += 1
                size = min(int(rng.paretovariate(1.15)) * 2, 3000, comments - written["comments"] - in_window)
                if size <= 0:
                    break
                submission = {"id": thread, "title": sentences.sentence(20), "subreddit": rng.choice(SUBREDDITS),
                              "selftext": sentences.text() if rng.random() < 0.3 else "", "author": "op",
                              "score": int(rng.paretovariate(1.1)), "created_utc": clock,
                              "num_comments": size, "permalink": f"/r/sub/comments/{thread}/_/"}
                window.append((submission, thread_comments(thread, size, clock, sentences, rng)))
                clock += rng.randrange(1, 30)
                in_window += size
                if rng.random() < COPIED_THREAD_SHARE and size < 200:
                    copy = f"x{thread_number:x}"
                    thread_number += 1
                    window.append(copy_thread(*window[-1], copy, rng))
                    in_window += size
                    for comment in window[-1][1]:
                        if comment["parent_id"].startswith("t3_"):
                            original = comment["id"].replace(copy, window[-2][0]["id"], 1)
                            pairs.write(json.dumps({"original": f"reddit:{original}",
                                                    "duplicate": f"reddit:{comment['id']}"}) + "\n")
                            written["near_duplicate_pairs"] += 1
            for submission, _ in window:
                rs.write((json.dumps(submission) + "\n").encode())
            window_comments = sorted((c for _, cs in window for c in cs), key=lambda c: c["created_utc"])
            rc.write("".join(json.dumps(c) + "\n" for c in window_comments).encode())
            written["submissions"] += len(window)
            written["comments"] += len(window_comments)
    summary = {**written, "lines": written["submissions"] + written["comments"],
               "bytes": {name: (folder / name).stat().st_size for name in ("RS_bench.zst", "RC_bench.zst")}}
    (folder / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return dump


# ---------------------------------------------------------------- measuring a stage process

@dataclass
class Row:
    stage: str
    size: str
    wall: float
    records: int  # input records the stage read
    peak_mb: float
    tree_peak_mb: float
    tree_anon_mb: float
    note: str = ""

    def line(self) -> str:
        return (f"| {self.stage} | {self.size} | {self.wall:7.1f} s | {self.records / self.wall:9,.0f} | "
                f"{self.peak_mb:7.0f} MB | {self.tree_peak_mb:7.0f} MB | {self.tree_anon_mb:7.0f} MB | {self.note} |")


# A fresh parent per run: RUSAGE_CHILDREN then covers this stage's processes only.
PARENT = """
import json, resource, subprocess, sys
code = subprocess.call(sys.argv[2:])
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
json.dump({"code": code, "maxrss_kb": usage.ru_maxrss}, open(sys.argv[1], "w"))
"""


def pss(process: psutil.Process) -> tuple[int, int]:
    """(Pss, Pss_Anon) of a process in bytes, from /proc/PID/smaps_rollup."""
    fields = {}
    with open(f"/proc/{process.pid}/smaps_rollup") as rollup:
        for line in rollup:
            name, _, value = line.partition(":")
            if name in ("Pss", "Pss_Anon"):
                fields[name] = int(value.split()[0]) * 1024
    return fields["Pss"], fields["Pss_Anon"]


def measure(command: list[str], cwd: Path) -> tuple[float, float, float, float]:
    """(wall seconds, peak RSS MB of the largest process, sampled peak PSS MB of the process tree, and of its
    anonymous pages)."""
    result = cwd / ".measure.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.perf_counter()
    with open(cwd / ".stage.log", "w") as log:
        parent = subprocess.Popen([sys.executable, "-c", PARENT, str(result), *command], cwd=cwd, env=env,
                                  stdout=subprocess.DEVNULL, stderr=log)
    tree_peak = tree_anon = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal tree_peak, tree_anon
        watched = psutil.Process(parent.pid)
        while not done.wait(0.1):
            try:
                sizes = [pss(p) for p in watched.children(recursive=True)]
            except (psutil.Error, OSError, KeyError):  # a process that ended between listing and reading
                continue
            tree_peak = max(tree_peak, sum(total for total, _ in sizes))
            tree_anon = max(tree_anon, sum(anon for _, anon in sizes))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    parent.wait()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    outcome = json.loads(result.read_text())
    if outcome["code"]:
        sys.exit(f"{' '.join(command)} failed in {cwd}; see {cwd / '.stage.log'}")
    return wall, outcome["maxrss_kb"] / 1024, tree_peak / 2**20, tree_anon / 2**20


def project(work: Path, dump: Dump, name: str, reddit_options: dict) -> Path:
    """A project folder whose params.yaml is this repository's, with the dump as the only collect source."""
    folder = work / name
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["collect"]["sources"] = [{"type": "reddit", "name": "reddit", "path": dump.paths, **reddit_options}]
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return folder


# ---------------------------------------------------------------- the stages

def run_collect(folder: Path, dump: Dump) -> Row:
    wall, peak, tree_peak, tree_anon = measure([sys.executable, str(REPO / "stages" / "collect.py")], folder)
    report = json.loads((folder / "reports" / "collect.json").read_text())
    buckets = yaml.safe_load((folder / "params.yaml").read_text())["collect"]["sources"][0].get("buckets", 0)
    note = (f"{report['totals']['written']['conversations']:,} conversations"
            + (", in-memory build (buckets: 1)" if buckets == 1 else ""))
    return Row("collect", f"{dump.comments:,}", wall, dump.lines, peak, tree_peak, tree_anon, note)


# The clean stage as it was before it ran on datatrove: everything in memory (chatforge/cleaning/pipeline.py).
IN_MEMORY_CLEAN_REV = "63b000f"


def in_memory_clean(folder: Path) -> list[str]:
    """A command running the in-memory clean stage of IN_MEMORY_CLEAN_REV in `folder` (its source exported
    beside it, its own `clean` params)."""
    source = folder.parent / f"clean-{IN_MEMORY_CLEAN_REV}"
    if not source.exists():
        source.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO), "archive", IN_MEMORY_CLEAN_REV, "chatforge", "stages"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(source)], input=archive, check=True)
    old_params = yaml.safe_load(subprocess.run(["git", "-C", str(REPO), "show", f"{IN_MEMORY_CLEAN_REV}:params.yaml"],
                                               check=True, capture_output=True, text=True).stdout)
    params = yaml.safe_load((folder / "params.yaml").read_text())
    (folder / "params.yaml").write_text(yaml.safe_dump({**params, "clean": old_params["clean"]}, sort_keys=False))
    # measure() puts this repository on PYTHONPATH; the old source must come first
    return [sys.executable, "-c", f"import runpy, sys; sys.path.insert(0, {str(source)!r}); "
            f"runpy.run_path({str(source / 'stages' / 'clean.py')!r}, run_name='__main__')"]


def thread_of_id(conversation_id: str) -> str:
    """The thread of a generated chain's id (`reddit:<thread>c<number>`; the number is decimal)."""
    return "t3_" + conversation_id.removeprefix("reddit:").rsplit("c", 1)[0]


def dedup_quality(folder: Path, dump: Dump) -> tuple[float, float, int, int]:
    """(recall, precision, same-thread drops, chance near-duplicates) of dedup on the dump's injected near-duplicate pairs.

    Recall: of the pairs whose two chains both reached dedup (neither dropped by an earlier step) and are
    long enough for near dedup (`near_dedup.min_words`), the share of which dedup dropped one. Precision: of
    the near-dedup drops, the share that are an injected pair, a chain of a copied thread matched to one of its
    original thread, or a pair whose exact shingle Jaccard similarity reaches `near_dedup.threshold` (a
    near-duplicate by the stage's own definition, made by chance: short chains sharing one long generated
    sentence); MinHash's false positives are the rest. Drops of a sibling chain of the same thread (chains of
    a thread share its opening post, so short replies leave them above the threshold) are counted apart, not
    in precision."""
    from chatforge.cleaning.config import CleanConfig
    from chatforge.cleaning.dedup import shingles

    near_config = section(CleanConfig, "clean").near_dedup
    pairs = [json.loads(line) for line in (dump.folder / "near_duplicates.jsonl").open()]
    injected = {frozenset((pair["original"], pair["duplicate"])) for pair in pairs}
    members = set().union(*injected)
    dropped_by, texts = {}, {}  # id → (stage, duplicate_of); id → record
    with open(folder / "data" / "clean" / "dropped.jsonl", encoding="utf-8") as dropped:
        for line in dropped:
            row = json.loads(line)
            dropped_by[row["id"]] = (row["stage"], row.get("duplicate_of"))
            if row["stage"] == "near_dedup":
                texts[row["id"]] = row["record"]
    long_enough = set()
    for _, record in iter_records(folder / "data" / "raw" / "conversations", SkipLog()):
        if record["id"] in members:
            if shingles([t["content"] for t in record["turns"]], near_config.ngram, near_config.min_words):
                long_enough.add(record["id"])
    # a copy may be matched to another chain of its original thread: the same opening post, near-identical
    copied_threads = {frozenset(thread_of_id(one) for one in pair) for pair in injected}
    dedup = ("exact_dedup", "near_dedup")
    reached = [pair for pair in injected if pair <= long_enough
               and all(dropped_by.get(one, ("",))[0] in ("", *dedup) for one in pair)]
    found = sum(any(dropped_by.get(one, ("",))[0] in dedup for one in pair) for pair in reached)
    near = {one: original for one, (stage, original) in dropped_by.items() if stage == "near_dedup"}
    wanted = set(near.values())
    for name in ("train", "val", "test"):
        with open(folder / "data" / "clean" / f"{name}.jsonl", encoding="utf-8") as kept:
            for line in kept:
                record = json.loads(line)
                if record["id"] in wanted:
                    texts[record["id"]] = record

    def shingle_set(one: str) -> set[bytes]:
        return set(shingles([turn["content"] for turn in texts[one]["turns"]], near_config.ngram, near_config.min_words))

    def jaccard(one: str, other: str) -> float:
        first, second = shingle_set(one), shingle_set(other)
        return len(first & second) / max(len(first | second), 1)

    siblings = {one for one, original in near.items() if texts[one]["meta"].get("thread")
                == texts[original]["meta"].get("thread") and frozenset((one, original)) not in injected}
    planted = {one for one, original in near.items() if one not in siblings and (
        frozenset((one, original)) in injected
        or frozenset((texts[one]["meta"]["thread"], texts[original]["meta"]["thread"])) in copied_threads)}
    by_chance = sum(jaccard(one, original) >= near_config.threshold for one, original in near.items()
                    if one not in siblings and one not in planted)
    correct = len(planted) + by_chance
    return found / max(len(reached), 1), correct / max(len(near) - len(siblings), 1), len(siblings), by_chance


def run_clean(folder: Path, dump: Dump) -> Row:
    """The clean stage on collect's output; in the in-memory run (collect with buckets: 1) the in-memory
    clean of IN_MEMORY_CLEAN_REV, for the ratio."""
    in_memory = yaml.safe_load((folder / "params.yaml").read_text())["collect"]["sources"][0].get("buckets") == 1
    command = in_memory_clean(folder) if in_memory else [sys.executable, str(REPO / "stages" / "clean.py")]
    wall, peak, tree_peak, tree_anon = measure(command, folder)
    report = json.loads((folder / "reports" / "clean.json").read_text())
    recall, precision, siblings, by_chance = dedup_quality(folder, dump)
    note = (f"{sum(report['output']['conversation'].values()):,} kept; dedup recall {recall:.3f} precision "
            f"{precision:.3f} ({by_chance:,} of the correct drops near-duplicates by chance, not injected; "
            f"+{siblings:,} same-thread chains near-deduped)"
            + (f"; in-memory clean ({IN_MEMORY_CLEAN_REV})" if in_memory else ""))
    return Row("clean", f"{dump.comments:,}", wall, sum(report["input"].values()), peak, tree_peak, tree_anon, note)


def run_tokenizer(folder: Path, dump: Dump) -> Row:
    """BPE trained from the streamed train texts (capped by `tokenizer.max_train_bytes`; the benchmark caps it
    at 100 MB as a user would on a dump); the tokenize stage needs it."""
    params = yaml.safe_load((folder / "params.yaml").read_text())
    params["tokenizer"]["max_train_bytes"] = params["tokenizer"]["max_train_bytes"] or 100_000_000
    (folder / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    wall, peak, tree_peak, tree_anon = measure([sys.executable, str(REPO / "stages" / "tokenizer.py")], folder)
    texts = sum(1 for _ in open(folder / "data" / "clean" / "train.jsonl", "rb"))
    return Row("tokenizer", f"{dump.comments:,}", wall, texts, peak, tree_peak, tree_anon,
               f"train texts, at most {params['tokenizer']['max_train_bytes']:,} bytes of them")


def run_tokenize(folder: Path, dump: Dump) -> Row:
    wall, peak, tree_peak, tree_anon = measure([sys.executable, str(REPO / "stages" / "tokenize_corpus.py")], folder)
    report = json.loads((folder / "reports" / "tokenize.json").read_text())
    texts = report["train"]["texts"] + report["val"]["texts"]
    tokens = report["train"]["tokens"] + report["val"]["tokens"]
    return Row("tokenize", f"{dump.comments:,}", wall, texts, peak, tree_peak, tree_anon,
               f"{tokens:,} tokens ({report['dtype']}, {report['train']['shards']} train shard(s))")


# in pipeline order; each runs in the folder the previous one wrote
STAGES = {"collect": run_collect, "clean": run_clean, "tokenizer": run_tokenizer, "tokenize": run_tokenize}
BASELINE_STAGES = ("collect", "clean")  # the stages that had an in-memory path to compare with


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="250000,1000000,4000000", help="comments per dump, comma-separated")
    parser.add_argument("--work", type=Path, default=Path("/tmp/chatforge-data-scale"),
                        help="dumps (kept for reruns) and one project folder per run")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="stages to run, in order; without collect, each size's streaming project folder of "
                             "an earlier run is continued")
    args = parser.parse_args()
    sizes = sorted(int(size) for size in args.sizes.split(","))
    stages = [STAGES[name] for name in STAGES if name in args.stages.split(",")]
    rows = []
    for comments in sizes:
        started = time.perf_counter()
        dump = generate(args.work / f"dump-{comments}", comments)
        print(f"dump of {comments:,} comments ({dump.lines:,} lines) ready in {time.perf_counter() - started:.0f} s",
              flush=True)
        baseline = comments == sizes[0] and stages[0] is run_collect
        runs = [("streaming", {})] + ([("in-memory", {"buckets": 1})] if baseline else [])
        for name, options in runs:
            folder = (project(args.work, dump, f"{name}-{comments}", options) if stages[0] is run_collect
                      else args.work / f"{name}-{comments}")
            for run_stage in stages:
                if name == "in-memory" and run_stage.__name__.removeprefix("run_") not in BASELINE_STAGES:
                    continue
                rows.append(run_stage(folder, dump))
                print(rows[-1].line(), flush=True)
            if name == "in-memory":  # only its rows are a baseline; its outputs are not needed
                shutil.rmtree(folder)
    print("\n| stage | comments | wall | records/s | peak RSS | tree peak PSS | tree anon PSS | |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print(row.line())
    for stage in STAGES:
        small = [row for row in rows if row.size == f"{sizes[0]:,}" and row.stage == stage]
        if len(small) == 2:
            streaming, in_memory = small
            print(f"\n{stage} at {sizes[0]:,} comments, streaming vs in-memory: peak RSS "
                  f"{streaming.peak_mb / in_memory.peak_mb:.2f}x (tree {streaming.tree_peak_mb / in_memory.tree_peak_mb:.2f}x, "
                  f"anon {streaming.tree_anon_mb / in_memory.tree_anon_mb:.2f}x), "
                  f"wall {streaming.wall / in_memory.wall:.2f}x")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
