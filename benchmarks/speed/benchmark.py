"""One family's benchmark: for every frame count (a `Case`), the FLOP analysis, the timings of every kind of
measurement against the baseline, and the result rows."""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.speed.families import Family
from benchmarks.speed.flops import FlopCount, counted_flops, flop_speedups
from benchmarks.speed.kinds import KINDS
from benchmarks.speed.measure import (
    alternate,
    bare,
    forward_step,
    generate_step,
    gradient_probe,
    median_seconds,
    ratio_variants,
    rewrap,
    scoring_step,
    train_step,
)
from stts_adapter import STTSConfig, STTSModel, apply_stts


@dataclass
class Case:
    """What the measurements of one (family, frames) share."""

    family: Family
    config: Any
    frames: int
    ratios: list[float]
    repeats: int
    batch: dict[str, torch.Tensor]
    prompt: dict[str, torch.Tensor]


def pruned_forward(model: STTSModel, batch: dict, ratio: float, count: bool) -> tuple[Any, int | None]:
    """An STTS forward at `ratio` (eval): its report, and its FlopCounterMode count when `count`."""
    model.set_prune_ratio(ratio)
    outputs: list[Any] = []
    run = forward_step(model, batch)
    flops = counted_flops(lambda: outputs.append(run())) if count else None
    return (outputs[0] if outputs else run()).stts, flops


def analytic_counts(
    model: STTSModel, family: Family, config: Any, report: Any, length: int, args: argparse.Namespace
) -> tuple[FlopCount, FlopCount, FlopCount, int]:
    """The analytic FLOPs of one video's forward with the kept units of `report` (an STTS forward's): baseline, STTS
    ideal, STTS as executed, and the LLM tokens pruned."""
    rows, columns = family.unit_grid(config, args.size)
    keep = report.keep_masks[0].cpu().reshape(-1, rows, columns)
    pruned = report.units_before[0] - report.units_after[0]
    base = family.flops(config, torch.ones_like(keep), length, args.prune_layer)
    hidden = model.scorer.hidden_size
    ideal = family.flops(config, keep, length - pruned, args.prune_layer, hidden)
    executed = family.flops(config, keep, length - pruned, args.prune_layer, hidden, executed=True)
    return base, ideal, executed, pruned


def flop_analysis(model: STTSModel, case: Case, args: argparse.Namespace) -> dict[str, Any]:
    """Analytic FLOPs of the baseline and of STTS at every ratio (with the kept units of a real forward), and the
    FlopCounterMode counts of the same forwards (`args.flop_check`)."""
    batch = case.batch
    length, prompt_length = batch["input_ids"].shape[1], case.prompt["input_ids"].shape[1]
    model.eval()
    per_ratio: dict[float, dict[str, Any]] = {}
    for ratio in case.ratios:
        report, counted = pruned_forward(model, batch, ratio, args.flop_check)
        base, ideal, executed, pruned = analytic_counts(model, case.family, case.config, report, length, args)
        per_ratio[ratio] = {
            "units": [report.units_before[0], report.units_after[0]],
            "sequence": [length, length - pruned],
            "ideal": ideal.as_dict(),
            "executed": executed.as_dict(),
            "executed_counted": counted,
            "executed_counted_ratio": executed.counted_forward() / counted if counted else None,
            "speedup": flop_speedups(base, ideal, case.config.text_config, prompt_length, pruned),
            "executed_speedup": flop_speedups(base, executed, case.config.text_config, prompt_length, pruned),
        }
    counted_base = counted_flops(bare(model, forward_step(model, batch))) if args.flop_check else None
    return {
        "baseline": base.as_dict(),
        "baseline_counted": counted_base,
        "baseline_counted_ratio": base.counted_forward() / counted_base if counted_base else None,
        "per_ratio": per_ratio,
    }


def measure_inference(model: STTSModel, case: Case) -> dict[str, Any]:
    """Forward and generate, the seconds of every round, baseline vs every ratio (forward also at ratio 0: the
    machinery's own overhead), and the scoring step alone (inference and training)."""
    model.eval()
    forward = forward_step(model, case.batch)
    forward_base, forward_stts = alternate(
        bare(model, forward), ratio_variants(model, [0.0, *case.ratios], forward), case.repeats
    )
    generate = generate_step(model, case.prompt)
    generate_base, generate_stts = alternate(
        bare(model, generate), ratio_variants(model, case.ratios, generate), case.repeats
    )
    scorer_forward = median_seconds(scoring_step(model, case.batch, training=False), case.repeats)
    model.train()
    scorer_train = median_seconds(scoring_step(model, case.batch, training=True), case.repeats)
    return {
        "forward": (forward_base, forward_stts[1:]),
        "generate": (generate_base, generate_stts),
        "forward_ratio0_s": statistics.median(forward_stts[0]),
        "scorer_forward_s": scorer_forward,
        "scorer_train_s": scorer_train,
    }


def measure_training(model: STTSModel, case: Case, whole_model: bool) -> tuple[list[float], list[list[float]]]:
    """Training step, the seconds of every round, baseline vs every ratio. Scorer-only: the baseline is the frozen
    bare model back-propagating to block prune_layer's output (`gradient_probe`)."""
    model.train()
    step = train_step(model, case.batch)
    baseline = bare(model, step) if whole_model else gradient_probe(model, step)
    return alternate(baseline, ratio_variants(model, case.ratios, step), case.repeats)


def timing_entry(baseline_runs: list[float], stts_runs: list[float], ideal: float) -> dict[str, Any]:
    """One kind's timings: the median seconds of baseline and STTS, the speed-up (of the medians) and its fraction of
    the ideal one, and the seconds of every round (`round_speedups` reads them)."""
    baseline, stts = statistics.median(baseline_runs), statistics.median(stts_runs)
    speedup = baseline / stts
    return {
        "baseline_s": baseline,
        "stts_s": stts,
        "speedup": speedup,
        "ideal": ideal,
        "of_ideal": speedup / ideal,
        "baseline_runs_s": list(baseline_runs),
        "stts_runs_s": list(stts_runs),
    }


def case_results(case: Case, flops: dict, inference: dict, scorer_train: tuple, whole_train: tuple) -> list[dict]:
    """One result row per ratio of a (family, frames) case."""
    timings = {
        "forward": inference["forward"],
        "generate": inference["generate"],
        "train_scorer": scorer_train,
        "train_whole": whole_train,
    }
    rows = []
    for index, ratio in enumerate(case.ratios):
        analysis = flops["per_ratio"][ratio]
        row = {
            "family": case.family.name,
            "frames": case.frames,
            "prune_ratio": ratio,
            "repeats": case.repeats,
            "video_tokens": analysis["units"],
            "llm_tokens": analysis["sequence"],
        }
        for kind in KINDS:
            baseline, stts = timings[kind]
            row[kind] = timing_entry(baseline, stts[index], analysis["speedup"][kind])
            row[kind]["executed_flops_speedup"] = analysis["executed_speedup"][kind]
        forward_base, whole_base = row["forward"]["baseline_s"], row["train_whole"]["baseline_s"]
        row["scorer"] = {
            "forward_fraction": inference["scorer_forward_s"] / forward_base,
            "train_fraction": inference["scorer_train_s"] / whole_base,
            "ratio0_forward_overhead": inference["forward_ratio0_s"] / forward_base - 1.0,
            "flops_fraction": FlopCount(**analysis["ideal"]).scoring() / FlopCount(**flops["baseline"]).forward(),
        }
        row["flops"] = {"baseline": flops["baseline"], **{k: analysis[k] for k in ("ideal", "executed")}}
        row["flop_check"] = {
            "baseline_counted": flops["baseline_counted"],
            "baseline_analytic_over_counted": flops["baseline_counted_ratio"],
            "stts_executed_counted": analysis["executed_counted"],
            "stts_executed_analytic_over_counted": analysis["executed_counted_ratio"],
        }
        rows.append(row)
    return rows


def ratios_at(frames: int, args: argparse.Namespace) -> list[float]:
    """Every ratio at the --all-ratios-at frame counts, the main ratio elsewhere."""
    if frames in args.all_ratios_at:
        return sorted(set(args.ratios))
    return [args.main_ratio]


def repeats_at(frames: int, args: argparse.Namespace) -> int:
    """Timed runs per variant at `frames`: at most --long-repeats from --long-from frames on."""
    return min(args.repeats, args.long_repeats) if frames >= args.long_from else args.repeats


def new_model(family: Family, config: Any, args: argparse.Namespace) -> STTSModel:
    """A random-init model of `family` wrapped with STTS at the main ratio (seeded: the memory children build
    the same weights)."""
    torch.manual_seed(0)  # the memory children build the same weights in the same order
    stts_config = STTSConfig(prune_ratio=args.main_ratio, prune_layer=args.prune_layer)
    return apply_stts(family.model(config, args.device, args.dtype, args.attn_implementation), stts_config)


def benchmark_family(family: Family, args: argparse.Namespace, progress: tqdm) -> list[dict]:
    """Every frame count of one family: FLOPs, inference and scorer-only training with the scorer-only model, then
    whole-model training on the same weights wrapped again with train_base_model=True."""
    config = family.make_config(args.size)
    model = new_model(family, config, args)
    cases, partial = [], []
    for frames in args.frames:
        case = Case(
            family=family,
            config=config,
            frames=frames,
            ratios=ratios_at(frames, args),
            repeats=repeats_at(frames, args),
            batch=family.batch(config, frames, args.size, answer=True, device=args.device, dtype=args.dtype),
            prompt=family.batch(config, frames, args.size, answer=False, device=args.device, dtype=args.dtype),
        )
        progress.set_postfix_str(f"{family.name}, {frames} frames")
        flops = flop_analysis(model, case, args)
        partial.append((flops, measure_inference(model, case), measure_training(model, case, whole_model=False)))
        cases.append(case)
        progress.update()
    model = rewrap(model, train_base_model=True)
    results = []
    for case, (flops, inference, scorer_train) in zip(cases, partial):
        progress.set_postfix_str(f"{family.name}, {case.frames} frames, whole model")
        whole_train = measure_training(model, case, whole_model=True)
        results += case_results(case, flops, inference, scorer_train, whole_train)
        progress.update()
    model.unload()
    return results
