"""`stts-adapter bench`: speed with and without STTS on a model and a synthetic video."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from .common import note
from .video import (
    Normalization,
    input_preparation,
    load_base_model,
    video_family,
    video_inputs,
    wrap_model,
)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(
    baseline: Callable[[], object], pruned: Callable[[], object], repeats: int, tick: Callable[[], None]
) -> tuple[float, float]:
    """Median seconds of `baseline` and `pruned`, measured alternately after one warm-up run of each (as
    `python -m benchmarks.speed` does). `tick()` is called after every run."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for round_ in range(repeats + 1):
        for index, run in enumerate((baseline, pruned)):
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if round_:
                times[index].append(elapsed)
            tick()
    return statistics.median(times[0]), statistics.median(times[1])


def run_bench(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..testing import moving_square_video

    progress_off = args.no_progress or None
    note(args, f"Loading {args.model} ...")
    model = load_base_model(args.model, args.revision, args.dtype, args.device)
    name, family = video_family(model)
    stts = wrap_model(model, args, train=args.train)
    processor, normalization = input_preparation(args.model, args.revision)
    device = torch.device(args.device)
    ratios = args.ratios if args.ratios else [stts.stts_config.prune_ratio]
    cases = [(frames, ratio) for frames in args.frames for ratio in ratios]
    runs_per_case = 2 * (args.repeats + 1) * (2 if args.train else 1)
    results = []
    with tqdm(total=len(cases) * runs_per_case, desc="bench", unit="run", disable=progress_off) as bar:
        for frames, ratio in cases:
            bar.set_description(f"bench {frames} frames, {ratio:.0%}")
            stts.set_prune_ratio(ratio)
            video = moving_square_video(frames, args.size, args.size)
            inputs = video_inputs(
                model, family, video, args.size, processor, normalization, labels=args.train, model_name=args.model
            )
            size = tuple(inputs.frames.shape[-2:])
            results.append(_measure(stts, inputs.batch, device, args, frames, ratio, size, bar.update))
    header = _bench_header(args, stts, name, normalization, inputs.source)
    table = bench_table(results, train=args.train)
    print(header + "\n\n" + table)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"setup": header, "results": results}, f, indent=2)
    return 0


def _measure(stts, batch, device, args, frames, ratio, size, tick) -> dict[str, Any]:
    def forward() -> None:
        with torch.no_grad():
            stts(**batch)
        _synchronize(device)

    def train_step() -> None:
        stts(**batch).loss.backward()
        stts.zero_grad(set_to_none=True)
        _synchronize(device)

    def without_stts(run: Callable[[], None]) -> Callable[[], None]:
        def run_base() -> None:
            with stts.disable_stts():
                run()

        return run_base

    stts.eval()
    reports = []
    handle = stts.register_report_hook(reports.append)  # what the timed STTS runs pruned
    try:
        base_s, stts_s = alternate(without_stts(forward), forward, args.repeats, tick)
    finally:
        handle.remove()
    report = reports[-1]
    result = {
        "frames": frames,
        "frame_size": list(size),
        "prune_ratio": ratio,
        "video_tokens": report.units_before[0],
        "video_tokens_kept": report.units_after[0],
        "forward_s": {"baseline": base_s, "stts": stts_s, "speedup": base_s / stts_s},
    }
    if args.train:
        stts.train()
        base_s, stts_s = alternate(without_stts(train_step), train_step, args.repeats, tick)
        stts.eval()
        result["train_step_s"] = {"baseline": base_s, "stts": stts_s, "speedup": base_s / stts_s}
    return result


def _bench_header(args, stts, family_name: str, normalization: Normalization | None, batch_source: str) -> str:
    c = stts.stts_config
    if args.adapter:
        source = f"adapter {args.adapter}"
    else:
        source = f"method {c.method}" + (" (untrained scorer: speed only)" if c.method == "scorer" else "")
    if normalization:
        batch_source += f"; pixels normalised as in {normalization.source}"
    return (
        f"{c.base_model_class} ({family_name}) from {args.model}; {source}; prune_layer {c.prune_layer}.\n"
        f"Synthetic video, batch {batch_source}.\n"
        f"{args.device}, {args.dtype}, torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads.\n"
        f"Medians of {args.repeats} runs after a warm-up, baseline (STTS disabled) and STTS alternated."
    )


def bench_table(results: list[dict[str, Any]], train: bool = False) -> str:
    """A markdown table of `stts-adapter bench` results."""
    head = "| frames | frame size | prune ratio | video tokens | forward baseline | forward STTS | speed-up |"
    rule = "|---|---|---|---|---|---|---|"
    if train:
        head += " train step baseline | train step STTS | speed-up |"
        rule += "---|---|---|"
    lines = [head, rule]
    for r in results:
        f = r["forward_s"]
        line = (
            f"| {r['frames']} | {r['frame_size'][0]}x{r['frame_size'][1]} | {r['prune_ratio']:.0%} "
            f"| {r['video_tokens']} -> {r['video_tokens_kept']} | {f['baseline'] * 1000:.1f} ms "
            f"| {f['stts'] * 1000:.1f} ms | {f['speedup']:.2f}x |"
        )
        if train:
            t = r["train_step_s"]
            line += f" {t['baseline'] * 1000:.1f} ms | {t['stts'] * 1000:.1f} ms | {t['speedup']:.2f}x |"
        lines.append(line)
    return "\n".join(lines)
