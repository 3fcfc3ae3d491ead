"""The command line of `python -m benchmarks.video_qa`: its options, the plan of runs, `--merge` and `--render`."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import Any

from benchmarks import video_qa
from benchmarks.common import RESULTS, argument_parser, command, read_json
from benchmarks.video_qa.data import INIT_OF_TASK, TASKS
from benchmarks.video_qa.jobs import Job, plan, run_all
from benchmarks.video_qa.report import machine, render, write_outputs
from benchmarks.video_qa.rows import QUICK_ROWS, REGIMES, ROWS
from benchmarks.video_qa.summary import claims, summarize
from benchmarks.video_qa.train import QUICK, TrainSettings, file_sha256, pretrain_all

CACHE = "benchmarks/.cache"  # the cached inits (gitignored), from the repository's root


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The options of `python -m benchmarks.video_qa` (see `--help`).

    Args:
        argv (`Sequence[str]`, *optional*): the arguments; None: the command line's.

    Returns:
        `argparse.Namespace`: the options.
    """
    parser = argument_parser(video_qa.__doc__, command("video_qa"))
    parser.add_argument("--out", default=RESULTS, help="output folder")
    parser.add_argument("--cache", default=CACHE, help="folder of the cached inits (safetensors)")
    parser.add_argument("--quick", action="store_true", help="baseline and STTS-50%%, 1 seed, short training")
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), help="rows to run (default: all)")
    parser.add_argument("--regimes", nargs="+", choices=REGIMES, help="regimes to run (default: both)")
    parser.add_argument("--seeds", type=int, nargs="+", help="fine-tuning seeds (default: 0 1 2; quick: 0)")
    parser.add_argument("--pretrain-steps", type=int, help="steps of the static task's init")
    parser.add_argument("--distractor-pretrain-steps", type=int, help="steps of the distractor task's init")
    parser.add_argument("--steps", type=int, help="fine-tuning steps per row")
    parser.add_argument("--eval-size", type=int, help="evaluation clips per task (balanced over question types)")
    parser.add_argument("--eval-split", choices=("test", "val"), default="test", help="tune on val, report on test")
    parser.add_argument(
        "--jobs", type=int, default=os.cpu_count() or 1, help="worker processes of 1 thread each (1: this process)"
    )
    parser.add_argument(
        "--render", action="store_true", help="only rewrite video_qa.md and video_qa.png from --out/video_qa.json"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="run --rows only and put their runs into --out/video_qa.json in place of any earlier runs of them (the "
        "report must have the same settings, split and seeds); the tables are recomputed from all runs",
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> TrainSettings:
    """The training settings: the defaults (or `--quick`'s) with the options given on the command line."""
    train = replace(TrainSettings(), **QUICK) if args.quick else TrainSettings()
    overrides = {
        "pretrain_steps": args.pretrain_steps,
        "distractor_pretrain_steps": args.distractor_pretrain_steps,
        "steps": args.steps,
        "eval_size": args.eval_size,
    }
    return replace(train, **{k: v for k, v in overrides.items() if v is not None})


def earlier_runs(
    args: argparse.Namespace, train: TrainSettings, seeds: Sequence[int], inits: dict[str, str]
) -> dict[str, Any]:
    """The report in `--out` that `--merge` adds to, refused unless it was made with the same settings, seeds and
    inits (`inits`: name -> sha256 of the inits this run uses)."""
    if not args.rows:
        raise SystemExit("--merge needs --rows: the rows to run again or to add.")
    path = os.path.join(args.out, "video_qa.json")
    report = read_json(path)
    same = (report["train"], report["eval_split"], report["quick"]) == (asdict(train), args.eval_split, args.quick)
    if not same or sorted({r["seed"] for r in report["runs"]}) != sorted(seeds):
        raise SystemExit(f"--merge: {path} was made with other settings, split or seeds.")
    recorded = report.get("inits")
    if recorded is None or any(recorded.get(name, sha256) != sha256 for name, sha256 in inits.items()):
        raise SystemExit(
            f"--merge: {path} was made from other inits (recorded sha256 {recorded or 'none'}, this run's "
            f"{inits}): the same settings give another init on another CPU or under another torch or transformers "
            "version. Run the whole table again (without --merge), or merge from the environment that made it."
        )
    if report["machine"] != machine():
        # An init the report has no runs from yet (a new task) is checked by the machine alone.
        raise SystemExit(
            f"--merge: {path} was made on {report['machine']}, this is {machine()}: an init pretrained here may "
            "differ from one pretrained there. Run the whole table again here (without --merge), or merge there."
        )
    return report


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (or `--render`) and write its outputs into `--out`.

    Args:
        argv (`Sequence[str]`, *optional*): the arguments; default: the command line's.

    Returns:
        `dict[str, Any]`: the report written to `--out/video_qa.json`.
    """
    args = parse_args(argv)
    if args.render:
        return render(args.out)
    report = run_benchmark(args)
    print(write_outputs(report, args.out))
    return report


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Pretrain the missing inits, run every job (with `--merge`, next to the earlier runs) and summarise.

    Args:
        args (`argparse.Namespace`): the options (`parse_args`).

    Returns:
        `dict[str, Any]`: the report (runs, summary, claims and settings).
    """
    started = time.perf_counter()
    train = settings_from(args)
    rows = [ROWS[name] for name in (args.rows or (QUICK_ROWS if args.quick else ROWS))]
    regimes = args.regimes or REGIMES
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    os.makedirs(args.out, exist_ok=True)
    workers = max(1, args.jobs)
    inits = pretrain_all(sorted({INIT_OF_TASK[row.task] for row in rows}), train, args.cache, workers)
    init_hashes = {name: file_sha256(path) for name, path in inits.items()}
    earlier = earlier_runs(args, train, seeds, init_hashes) if args.merge else {"runs": [], "seconds": 0.0}
    jobs = plan(rows, regimes, seeds, inits, args.out)
    results = merged(earlier["runs"], jobs, run_all(jobs, train, args.eval_split, workers))
    if args.merge:
        rows = [row for row in ROWS.values() if any(r["row"] == row.name for r in results)]
    summary = summarize(results, rows)
    return {
        "machine": machine(),
        "workers": workers,
        "quick": args.quick,
        "eval_split": args.eval_split,
        "seconds": earlier["seconds"] + time.perf_counter() - started,
        "tasks": {task: asdict(video) for task, video in TASKS.items()},
        "train": asdict(train),
        "inits": {**earlier.get("inits", {}), **init_hashes},  # sha256 of each init the runs start from
        "runs": results,
        "summary": summary,
        "claims": claims(summary),
    }


def merged(earlier: list[dict[str, Any]], jobs: Sequence[Job], results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The earlier runs of every (row, regime) that `jobs` did not run again, then `results`."""
    replaced = {(job.row, job.regime) for job in jobs}
    return [r for r in earlier if (r["row"], r["regime"]) not in replaced] + results
