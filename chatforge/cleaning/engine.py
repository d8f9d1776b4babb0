"""The clean pipeline on datatrove: shard folders in, data/clean's files and the report's figures out.

Phases (each a datatrove pipeline run by the executor `clean.executor` names):
  records  (`clean.tasks` tasks)   read shards → structure → normalize → PII → preference check →
                                   quality → language (each drop to its exclusion writer) → dedup keys and
                                   MinHash signatures → kept records to working shards
  buckets  (LSH bands tasks)       datatrove's MinhashDedupBuckets: records sharing a band
then, in this process and in input order: duplicates decided (duplicates.py), outputs streamed (output.py).
The working folder (shards, keys, signatures, logs) is a temporary one, removed when the stage succeeds.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Callable

from datatrove.pipeline.dedup.minhash import MinhashDedupBuckets
from datatrove.pipeline.writers import JsonlWriter
from datatrove.utils.logging import logger

from chatforge.cleaning.config import CleanConfig
from chatforge.cleaning.dedup_index import DedupIndex, minhash_config
from chatforge.cleaning.duplicates import DuplicateFinder
from chatforge.cleaning.output import write_outputs
from chatforge.cleaning.reader import ShardReader
from chatforge.cleaning.records import KINDS, shard_row
from chatforge.cleaning.steps import STEPS, LanguageStep
from chatforge.console import log
from chatforge.errors import ChatforgeError
from chatforge.files import SkipLog
from chatforge.shards import shard_paths

SLURM_POLL_SECONDS = 30


def _shards(folder: Path) -> JsonlWriter:
    return JsonlWriter(str(folder), output_filename="${rank}.jsonl", compression=None, adapter=shard_row)


def records_pipeline(inputs: dict[str, Path], work: Path, config: CleanConfig, naive: bool = False) -> list:
    steps = [step(config, _shards(work / "dropped" / step.__name__)) for step in STEPS if step is not LanguageStep]
    language = LanguageStep(config, _shards(work / "dropped" / LanguageStep.__name__), naive=naive)
    return [ShardReader({kind: str(path) for kind, path in inputs.items()}, str(work), config.chunk_size),
            *steps, language, DedupIndex(str(work), config, naive), _shards(work / "kept")]


def buckets_pipeline(work: Path, config: CleanConfig) -> list:
    return [MinhashDedupBuckets(str(work / "buckets"), str(work / "dups"), config=minhash_config(config.near_dedup))]


def make_executor(pipeline: list, tasks: int, config: CleanConfig, logs: Path, depends=None):
    if config.executor == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(pipeline, tasks=tasks, workers=min(config.workers, tasks), logging_dir=str(logs),
                                     skip_completed=False, start_method="fork")
    if config.executor == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        return SlurmPipelineExecutor(pipeline, tasks=tasks, logging_dir=str(logs), depends=depends,
                                     skip_completed=False, **config.slurm)
    from datatrove.executor import RayPipelineExecutor

    return RayPipelineExecutor(pipeline, tasks=tasks, workers=config.workers, logging_dir=str(logs),
                               skip_completed=False, **config.ray)


def _check_complete(executor, name: str, logs: Path) -> None:
    """Ray (and Slurm) report failed tasks in their logs only; the stage stops with one line instead."""
    if incomplete := executor.get_incomplete_ranks(skip_completed=True):
        raise ChatforgeError(f"clean: {len(incomplete)} of {executor.world_size} tasks of engine phase {name!r} "
                             f"failed (first: rank {incomplete[0]}); task logs in {logs}")


def _slurm_job_queued(job_id: str) -> bool:
    listed = subprocess.run(["squeue", "--noheader", "--jobs", job_id], capture_output=True, text=True)
    return bool(listed.stdout.strip())


def run_phases(phases: list[tuple[str, list, int]], config: CleanConfig, work: Path, on_phase: Callable) -> None:
    """Local and Ray executors run one phase after another; Slurm gets the chain of job arrays at once
    (each depending on the previous) and this process waits for each in turn."""
    submitted, executor = [], None
    for name, pipeline, tasks in phases:
        logs = work / "logs" / name
        executor = make_executor(pipeline, tasks, config, logs, depends=executor)
        submitted.append((name, executor, logs))
        if config.executor == "slurm":
            continue
        on_phase(name, None)
        if config.executor == "local":
            logger.disable("datatrove")  # its per-task logs would bury the stage's progress; stats stay in logs/
        try:
            executor.run()
        finally:
            logger.enable("datatrove")
        _check_complete(executor, name, logs)
    if config.executor == "slurm":
        executor.run()  # submits the chain, dependencies first
        log("clean", f"submitted {len(phases)} Slurm job arrays; waiting (logs: {work / 'logs'})")
        for name, executor, logs in submitted:
            on_phase(f"slurm {name}", None)
            while executor.get_incomplete_ranks(skip_completed=True) and _slurm_job_queued(executor.job_id):
                time.sleep(SLURM_POLL_SECONDS)
            _check_complete(executor, name, logs)


def reader_summary(work: Path, tasks: int) -> tuple[dict, SkipLog]:
    counts, skips = Counter(), SkipLog()
    for rank in range(tasks):
        summary = json.loads((work / "reader" / f"{rank:05d}.json").read_text())
        counts.update(summary["input"])
        skips.counts.update(summary["skips"]["by_reason"])
        skips.examples.extend(summary["skips"]["examples"][:skips.max_examples - len(skips.examples)])
    return {kind: counts[kind] for kind in KINDS if counts[kind]}, skips


def near_report(config: CleanConfig, clusters: dict, rejected: int) -> dict:
    near = config.near_dedup
    bands, rows = near.bands_rows()
    return {"num_perm": near.num_perm, "ngram": near.ngram, "threshold": near.threshold, "min_words": near.min_words,
            "lsh_bands": bands, "lsh_rows": rows, **clusters, "minhash_matches_rejected_by_exact_jaccard": rejected}


def _no_progress(*args) -> None:
    pass


class PhaseClock:
    """Seconds per phase, for the report (where a run's time goes at scale); passes each phase on to the
    progress callback."""

    def __init__(self, on_phase: Callable):
        self.on_phase, self.seconds = on_phase, {}
        self.phase, self.start = None, time.perf_counter()

    def stop(self) -> None:
        if self.phase:
            self.seconds[self.phase] = round(time.perf_counter() - self.start, 1)
        self.phase, self.start = None, time.perf_counter()

    def __call__(self, name: str, total: int | None) -> None:
        self.stop()
        self.phase = name
        self.on_phase(name, total)


def clean_shards(inputs: dict[str, Path], config: CleanConfig, out: Path, on_phase: Callable = _no_progress,
                 on_record: Callable = _no_progress, naive: bool = False) -> tuple[dict, SkipLog]:
    """Clean the shard folders `inputs` (kind → folder) into folder `out`; returns (report, skipped lines).
    Progress: `on_phase(name, total records or None)` as each phase starts, `on_record()` per record written."""
    root = Path(config.work_dir) if config.work_dir else None
    if root:
        root.mkdir(parents=True, exist_ok=True)
    for folder in inputs.values():
        shard_paths(folder)  # a missing folder stops here with one line, not in every task
    work = Path(tempfile.mkdtemp(prefix="chatforge-clean-", dir=root))
    next_phase = PhaseClock(on_phase)
    try:
        phases = [("records", records_pipeline(inputs, work, config, naive), config.tasks)]
        if config.near_dedup.enabled:
            bands, _ = config.near_dedup.bands_rows()
            phases.append(("buckets", buckets_pipeline(work, config), bands))
        run_phases(phases, config, work, next_phase)
        counts_in, skips = reader_summary(work, config.tasks)
        next_phase("duplicates", None)
        duplicates = DuplicateFinder(work, config, config.tasks).find()
        next_phase("write", sum(counts_in.values()))
        figures = write_outputs(work, config.tasks, duplicates, config, out, on_record)
        next_phase.stop()
    except BaseException:
        log("clean", f"engine working folder kept for inspection: {work}")
        raise
    shutil.rmtree(work, ignore_errors=True)
    dedup = {**figures.pop("dedup_counts"),
             **{kind: near_report(config, duplicates.clusters[kind], duplicates.rejected[kind])
                for kind in ("conversation", "document")}}
    return {"input": counts_in, **figures, "dedup": dedup, "phase_seconds": next_phase.seconds}, skips
