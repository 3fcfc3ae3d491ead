"""The command line of `python -m benchmarks.speed`: its options, the benchmark run and its outputs."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from benchmarks import speed
from benchmarks.common import RESULTS, argument_parser, command, read_json
from benchmarks.speed.benchmark import benchmark_family
from benchmarks.speed.families import DEFAULT_FAMILIES, DTYPES, FAMILIES
from benchmarks.speed.memory import attach_memory, measure_memory
from benchmarks.speed.profiling import profile_family
from benchmarks.speed.report import machine_name, render, write_outputs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The options of `python -m benchmarks.speed` (see `--help`), with `--quick`'s and the defaults that depend on
    other options applied.

    Args:
        argv (`Sequence[str]`, *optional*): the arguments; default: the command line's.

    Returns:
        `argparse.Namespace`: the options.
    """
    parser = argument_parser(speed.__doc__, command("speed"))
    parser.add_argument(
        "--family",
        nargs="+",
        choices=sorted(FAMILIES),
        default=list(DEFAULT_FAMILIES),
        help=f"model families (default: {' '.join(DEFAULT_FAMILIES)}; qwen2_5_vl_3b has Qwen2.5-VL-3B's real shapes, "
        "for a GPU: --device cuda --dtype bfloat16 --frames 128)",
    )
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.8])
    parser.add_argument("--main-ratio", type=float, default=0.5, help="the ratio measured at every frame count")
    # 64 frames cost about as much as 8, 16 and 32 together: the default measures them at the main ratio only, with
    # --long-repeats, which keeps the default run near 20 min on 2 cores (the full grid: ~25 min).
    parser.add_argument(
        "--all-ratios-at",
        type=int,
        nargs="+",
        default=[8, 16, 32],
        help="frame counts at which every --ratios value runs; the others run --main-ratio only",
    )
    parser.add_argument("--prune-layer", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (medians reported)")
    parser.add_argument("--long-from", type=int, default=64, help="frame counts from which --long-repeats applies")
    parser.add_argument("--long-repeats", type=int, default=2, help="at most this many repeats there")
    parser.add_argument("--size", type=int, default=None, help="frame side in pixels (default 224; --quick: 112)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda[:N] (timings synchronize; memory from CUDA)")
    parser.add_argument(
        "--dtype", default="float32", choices=sorted(DTYPES), help="the model's and the pixels' dtype (default float32)"
    )
    parser.add_argument(
        "--attn-implementation",
        default="sdpa",
        help="the base model's attention (transformers' attn_implementation): sdpa (default), eager, or "
        "flash_attention_2 on a GPU with flash-attn installed (STTS's biased block k+1 keeps SDPA: it adds a key bias)",
    )
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory processes")
    parser.add_argument(
        "--memory-workers", type=int, help="peak-memory processes at a time (default: cores / threads; CUDA: 1)"
    )
    parser.add_argument("--no-flop-check", dest="flop_check", action="store_false", help="skip FlopCounterMode")
    parser.add_argument("--quick", action="store_true", help="smoke mode: 8 frames of 112 px, one ratio, 1 repeat")
    parser.add_argument("--profile", action="store_true", help="profile frames[0], ratios[0] instead of benchmarking")
    parser.add_argument(
        "--render", action="store_true", help="only rewrite speed.md and speed.png from --out/speed.json"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="add this run's rows to --out/speed.json (replacing rows of the same family, frames and ratio) instead "
        "of starting a new report; the machine and settings must be the same",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.frames, args.ratios, args.main_ratio, args.repeats, args.long_repeats = [8], [0.5], 0.5, 1, 1
    if args.size is None:
        args.size = 112 if args.quick else 224
    if args.main_ratio not in args.ratios:
        args.ratios = sorted({*args.ratios, args.main_ratio})
    return args


def run_benchmark(args: argparse.Namespace) -> list[dict]:
    """Every family's result rows, with the peak memory of every (family, frames, ratio) attached (`args.memory`).

    Args:
        args (`argparse.Namespace`): the options (`parse_args`).

    Returns:
        `list[dict]`: a row per family, frame count and ratio.
    """
    cases = len(args.frames) * len(args.family) * 2
    with tqdm(total=cases, desc="benchmark") as progress:
        results = [row for name in args.family for row in benchmark_family(FAMILIES[name], args, progress)]
    if args.memory:
        jobs = list(
            dict.fromkeys((r["family"], r["frames"], ratio) for r in results for ratio in (None, r["prune_ratio"]))
        )
        attach_memory(results, measure_memory(jobs, args))
    return results


COMPARABLE = ("machine", "device", "dtype", "attn_implementation", "size", "prune_layer", "main_ratio", "threads")


def merged_report(out: str, results: list[dict], settings: dict) -> tuple[list[dict], dict]:
    """`--merge`: the report in `out` with this run's rows in place of (or beside) its rows of the same family, frame
    count and ratio, and this run's command line recorded under `settings["merged"]`.

    Raises:
        SystemExit: if there is no report there, or it was made with other settings or on another machine.
    """
    path = os.path.join(out, "speed.json")
    if not os.path.isfile(path):
        raise SystemExit(f"--merge: there is no {path} to add to; run without --merge first.")
    earlier = read_json(path)
    old_settings = earlier["settings"]
    defaults = {"dtype": "float32", "attn_implementation": "sdpa"}  # reports from before these options
    different = [k for k in COMPARABLE if old_settings.get(k, defaults.get(k)) != settings[k]]
    if different:
        raise SystemExit(f"--merge: {path} was made with other {', '.join(different)}; its rows would not compare.")
    key = lambda row: (row["family"], row["frames"], row["prune_ratio"])
    new = {key(row) for row in results}
    rows = [row for row in earlier["results"] if key(row) not in new] + results
    rows.sort(key=lambda row: (list(FAMILIES).index(row["family"]), row["frames"], row["prune_ratio"]))
    merged = {k: settings[k] for k in ("argv", "seconds")}
    return rows, {**old_settings, "merged": [*old_settings.get("merged", []), merged]}


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark (or `--profile`, or `--render`) and write its outputs into `--out`.

    Args:
        argv (`Sequence[str]`, *optional*): the arguments; default: the command line's.
    """
    args = parse_args(argv)
    if args.render:
        render(args.out)
        return
    torch.set_num_threads(args.threads)
    if args.profile:
        for name in args.family:
            profile_family(FAMILIES[name], args)
        return
    start = time.perf_counter()
    results = run_benchmark(args)
    settings = {
        "machine": machine_name(args.threads, args.device),
        "device": args.device,
        "dtype": args.dtype,
        "attn_implementation": args.attn_implementation,
        "size": args.size,
        "prune_layer": args.prune_layer,
        "main_ratio": args.main_ratio,
        "threads": args.threads,
        "seconds": time.perf_counter() - start,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "command": command("speed"),
    }
    if args.merge:
        results, settings = merged_report(args.out, results, settings)
    print(write_outputs(results, settings, args.out))
    print(f"Wrote speed.json, speed.md, speed.png to {args.out} in {settings['seconds']:.0f} s.")
