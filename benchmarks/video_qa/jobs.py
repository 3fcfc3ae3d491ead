"""The runs: a `Job` is one row in one regime with one seed, fine-tuned from its init and evaluated; `plan` lists them,
`run_all` runs them in worker processes."""

from __future__ import annotations

import multiprocessing
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.video_qa.data import INIT_OF_TASK, TASKS, clip_set, clip_stream
from benchmarks.video_qa.evaluate import evaluate
from benchmarks.video_qa.pictures import draw_kept_units, picture_clips
from benchmarks.video_qa.rows import PICTURE_ROWS, ROWS, Row
from benchmarks.video_qa.train import Curves, TrainSettings, build_model, train_steps


@dataclass(frozen=True)
class Job:
    """One run: a row, trained (or not) in one regime with one seed, then evaluated.

    Args:
        row (`str`): a key of `ROWS`.
        regime (`str`): "frozen" (the base model stays as the init; only a learned scorer trains) or "trained" (every
            parameter fine-tuned, the paper's setting).
        seed (`int`): the fine-tuning data order, the scorer's init and the random masks (the init is shared).
        init (`str`): path of the cached init.
        picture (`str`, *optional*): where to draw the kept units of two test clips after training.
    """

    row: str
    regime: str
    seed: int
    init: str
    picture: str | None = None


def plan(
    rows: Sequence[Row], regimes: Sequence[str], seeds: Sequence[int], inits: dict[str, str], out: str
) -> list[Job]:
    """Every (row, regime, seed) run, the longest first (training end to end, then the scorer alone, then
    evaluation only) so that the workers finish together."""
    jobs = []
    for row in rows:
        for regime in (r for r in regimes if r in row.regimes):
            for seed in seeds:
                picture = PICTURE_ROWS.get(row.name) if regime == "frozen" and seed == seeds[0] else None
                init = inits[INIT_OF_TASK[row.task]]
                jobs.append(Job(row.name, regime, seed, init, os.path.join(out, picture) if picture else None))

    def cost(job: Job) -> int:
        row = ROWS[job.row]
        return 3 if row.two_phase else 2 if job.regime == "trained" else int(row.trains_in_frozen_regime)

    return sorted(jobs, key=cost, reverse=True)


def fine_tune(job: Job, train: TrainSettings, row: Row | None = None) -> tuple[torch.nn.Module, Curves]:
    """The model of one job, built from its init and fine-tuned as its row says (nothing to train: as built), and
    its training curves. `row` replaces the job's row (a variant of it, e.g. other options)."""
    row = row or ROWS[job.row]
    model = build_model(row, job.regime, job.seed, job.init, train)
    torch.manual_seed(20_000 + job.seed)  # the random method draws its training-time masks from torch's RNG
    curves = Curves()
    label = f"{row.name} {job.regime} seed {job.seed}"
    stream = clip_stream("train", job.seed, TASKS[row.task])
    if row.two_phase:
        model.set_trainable(scorer=True, base=False)
        curves = train_steps(model, row, stream, train.steps, train.lr, train, f"{label}, scorer phase")
        model.set_trainable(scorer=False, base=True)
        curves.extend(train_steps(model, row, stream, train.steps, train.lr, train, f"{label}, base phase"))
    elif job.regime == "trained" or row.trains_in_frozen_regime:
        curves = train_steps(model, row, stream, train.steps, train.lr, train, label)
    return model, curves


def run(job: Job, train: TrainSettings, eval_split: str, threads: int) -> dict[str, Any]:
    """Fine-tune one row from its task's init (unless it has nothing to train in its regime), then evaluate it on
    the task's evaluation set."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    row = ROWS[job.row]
    model, curves = fine_tune(job, train)
    clips = clip_set(eval_split, train.eval_size, TASKS[row.task])
    if job.picture:
        draw_kept_units(model, picture_clips(clips), row, job.picture)
    return {
        "row": job.row,
        "regime": job.regime,
        "seed": job.seed,
        **evaluate(model, clips, row, train),
        **curves.summary(),
        "seconds": time.perf_counter() - start,
    }


def run_all(jobs: list[Job], train: TrainSettings, eval_split: str, workers: int) -> list[dict[str, Any]]:
    """Every job, in `workers` processes of one torch thread each (tiny models use one core better than two threads
    do), or in this process with all its threads when `workers` is 1. Results in the order of `jobs`."""
    if workers == 1:
        return [report_run(run(job, train, eval_split, torch.get_num_threads())) for job in jobs]
    context = multiprocessing.get_context("spawn")  # no fork of a process whose OpenMP pool is running
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(run, job, train, eval_split, 1) for job in jobs]
        for future in as_completed(futures):
            report_run(future.result())
        return [future.result() for future in futures]


def report_run(result: dict[str, Any]) -> dict[str, Any]:
    """Print one run's accuracy and time; returns the run."""
    print(
        f"{result['row']} {result['regime']} seed {result['seed']}: accuracy {result['accuracy']:.1f}% "
        f"({result['seconds']:.0f} s)",
        flush=True,
    )
    return result
