"""`--profile`: where STTS spends its time (the forward's stages, cProfile of the library's functions, torch.profiler's
aten ops), against the bare model."""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import time
from collections.abc import Callable
from typing import Any

from benchmarks.speed.benchmark import analytic_counts, new_model
from benchmarks.speed.families import Family
from benchmarks.speed.flops import FlopCount
from benchmarks.speed.measure import (
    alternate,
    bare,
    forward_step,
    rewrap,
    round_robin,
    synchronize,
    timed,
    train_step,
)
from stts_adapter import STTSModel

CONTAINERS = {"forward", "_prune_inputs", "encode_videos", "run_block", "_forward_frames", "__call__"}


def library_time_table(profile: cProfile.Profile, limit: int = 15) -> list[str]:
    """Cumulative time of the library's functions (stts_adapter, model_registry) in a cProfile run, leaving out the
    ones that contain the base model's own work (`CONTAINERS`)."""
    stats = pstats.Stats(profile).stats  # {(file, line, function): (calls, primitive calls, tottime, cumtime, ...)}
    rows = [
        (cumtime, calls, f"{os.path.basename(path)}:{function}")
        for (path, _, function), (_, calls, _, cumtime, _) in stats.items()
        if ("stts_adapter" in path or "model_registry" in path) and function not in CONTAINERS
    ]
    return [
        f"  {cumtime * 1000:8.1f} ms  {calls:4d} calls  {name}" for cumtime, calls, name in sorted(rows)[::-1][:limit]
    ]


def op_times(run: Callable[[], object]) -> dict[str, tuple[float, int]]:
    """{aten op: (self CPU ms, calls)} of one run under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    return {e.key: (e.self_cpu_time_total / 1000, e.count) for e in prof.key_averages()}


def op_table(baseline: dict, stts: dict, limit: int = 18) -> list[str]:
    """Ops by STTS self time next to the baseline's: ops far above the baseline's share are STTS overhead."""
    lines = [f"  {'op':58s} {'baseline ms':>12s} {'STTS ms':>9s} {'calls b/s':>11s}"]
    for name, (ms, calls) in sorted(stts.items(), key=lambda item: -item[1][0])[:limit]:
        base_ms, base_calls = baseline.get(name, (0.0, 0))
        lines.append(f"  {name[:58]:58s} {base_ms:12.1f} {ms:9.1f} {base_calls:5d}/{calls:<5d}")
    return lines


def profile_family(family: Family, args: argparse.Namespace) -> None:
    """Time, cProfile and torch.profiler one STTS forward and one whole-model training step, against the bare model."""
    frames, ratio = args.frames[0], args.ratios[0]
    config = family.make_config(args.size)
    model = rewrap(new_model(family, config, args), train_base_model=True)
    model.set_prune_ratio(ratio)
    batch = family.batch(config, frames, args.size, answer=True, device=args.device, dtype=args.dtype)
    for kind, training in (("forward", False), ("training step, whole model", True)):
        model.train(training)
        step = train_step(model, batch) if training else forward_step(model, batch)
        base_runs, (stts_runs,) = alternate(bare(model, step), [step], args.repeats)
        base_s, stts_s = statistics.median(base_runs), statistics.median(stts_runs)
        profile = cProfile.Profile()
        profile.runcall(step)
        print(
            f"\n=== {family.name}, {frames} frames, {ratio:.0%}, {kind}: baseline {base_s * 1000:.0f} ms, STTS "
            f"{stts_s * 1000:.0f} ms ({base_s / stts_s:.2f}x)"
        )
        print("library functions (cumulative, cProfile, base-model containers left out):")
        print("\n".join(library_time_table(profile)))
        print("aten ops (self CPU time, torch.profiler):")
        print("\n".join(op_table(op_times(bare(model, step)), op_times(step))))
        if not training:
            print_stages(model, family, config, batch, args)
    model.unload()


def print_stages(model: STTSModel, family: Family, config: Any, batch: dict, args: argparse.Namespace) -> None:
    """The forward's stage table (`stage_table`) of the STTS model in eval mode against the bare model."""
    step = forward_step(model, batch)
    length = batch["input_ids"].shape[1]
    base, ideal, _, _ = analytic_counts(model, family, config, step().stts, length, args)
    clock = StageClock(model, family)
    try:
        times = median_stage_times(clock, {"baseline": bare(model, step), "STTS": step}, args.repeats)
    finally:
        clock.remove()
    print(f"stages of the forward (hooks on the base model's modules, medians of {args.repeats}; FLOPs: the ideal):")
    print("\n".join(stage_table(times, base, ideal)))


# The forward's stages, in order, and the FlopCount fields that count each one.
STAGE_FLOPS = {
    "patch embedding": ("patch_embed",),
    "ViT blocks 0..prune_layer": ("vit_head", "vit_head_attention"),
    "scoring (STTS only)": ("scorer_input", "scorer"),
    "block prune_layer+1 (key bias)": ("bias_block_qkv", "bias_block", "bias_block_attention"),
    "ViT blocks after (kept units)": ("vit_tail", "vit_tail_attention"),
    "connector": ("connector",),
    "LLM": ("llm", "llm_attention"),
    "lm_head": ("lm_head",),
}
SCORING = "scoring (STTS only)"
VIT_STAGES = ("ViT blocks 0..prune_layer", "block prune_layer+1 (key bias)", "ViT blocks after (kept units)")
BETWEEN = "between the stages"
WHOLE = "whole forward"


class StageClock:
    """Seconds a forward spends in each of `STAGE_FLOPS`' stages, from hooks on the base model's own modules (inside
    STTS's wrappers, so that STTS's work around them is not counted as theirs). Scoring is the time from the end of
    block prune_layer to the start of block prune_layer + 1; what falls between the other stages (input preparation,
    packing, scattering) is `BETWEEN`.

    Args:
        model (`STTSModel`): the wrapped model (the bare one is timed through `disable_stts`).
        family (`Family`): where its patch embedding and connector are.
    """

    def __init__(self, model: STTSModel, family: Family) -> None:
        base = model.transformers_model
        layer = model.stts_config.prune_layer
        vision_blocks = model.architecture.get_vision_blocks(base)
        blocks = [getattr(block, "base_layer", block) for block in vision_blocks]
        stages = {family.patch_embedding: "patch embedding", "lm_head": "lm_head", "model.language_model": "LLM"}
        modules = [(base.get_submodule(path), stage) for path, stage in stages.items()]
        for index, block in enumerate(blocks):  # before, at and after block prune_layer + 1
            modules.append((block, VIT_STAGES[min(2, max(0, index - layer))]))
        connector = base.get_submodule(family.connector)
        modules.append((getattr(connector, "base_layer", connector), "connector"))
        self.seconds: dict[str, float] = {}
        self._started: dict[str, float] = {}
        self._handles = []
        for module, stage in modules:
            self._handles.append(module.register_forward_pre_hook(self._starter(stage)))
            # prepended: it runs before any hook of STTS's own on the same module
            self._handles.append(module.register_forward_hook(self._stopper(stage), prepend=True))
        self._handles.append(blocks[layer].register_forward_hook(self._starter(SCORING)))
        self._handles.append(blocks[layer + 1].register_forward_pre_hook(self._stopper(SCORING), prepend=True))

    def _starter(self, stage: str) -> Callable[..., None]:
        def start(*_: object) -> None:
            synchronize()
            self._started[stage] = time.perf_counter()

        return start

    def _stopper(self, stage: str) -> Callable[..., None]:
        def stop(*_: object) -> None:
            synchronize()
            elapsed = time.perf_counter() - self._started.pop(stage)
            self.seconds[stage] = self.seconds.get(stage, 0.0) + elapsed

        return stop

    def time(self, run: Callable[[], object]) -> dict[str, float]:
        """Seconds by stage of one `run()`, with `BETWEEN` (the rest of its time) and `WHOLE`."""
        self.seconds = {}
        total = timed(run)
        stages = {stage: self.seconds.get(stage, 0.0) for stage in STAGE_FLOPS}
        return {**stages, BETWEEN: total - sum(stages.values()), WHOLE: total}

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()


def median_stage_times(clock: StageClock, runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, dict]:
    """{run name: {stage: median seconds}}, the runs measured round-robin (`round_robin`) by `clock`."""
    samples = round_robin(list(runs.values()), repeats, measure=clock.time)
    return {
        name: {stage: statistics.median(times[stage] for times in timings) for stage in timings[0]}
        for name, timings in zip(runs, samples)
    }


def stage_flops(count: FlopCount) -> dict[str, float]:
    """{stage: FLOPs} of a forward's analytic count."""
    return {stage: sum(getattr(count, field) for field in fields) for stage, fields in STAGE_FLOPS.items()}


def stage_table(times: dict[str, dict], base: FlopCount, ideal: FlopCount) -> list[str]:
    """Each stage's baseline and STTS times, measured speed-up against the stage's FLOP speed-up, and its share of the
    baseline's time against its share of the baseline's FLOPs; then the forward's speed-up if every stage ran at its
    FLOP speed-up (the scorer at the baseline ViT's time per FLOP, the time between the stages unchanged)."""
    base_s, stts_s = times["baseline"], times["STTS"]
    base_flops, ideal_flops = stage_flops(base), stage_flops(ideal)
    total_s, total_flops = base_s[WHOLE], base.forward()
    header = f"  {'stage':32s} {'baseline ms':>11s} {'STTS ms':>8s} {'speed-up':>8s} {'FLOP speed-up':>13s}"
    lines = [header + f" {'share of time / FLOPs (baseline)':>33s}"]
    for stage in [*STAGE_FLOPS, BETWEEN, WHOLE]:
        flops = base_flops.get(stage, total_flops if stage == WHOLE else 0.0)
        stts_flops = ideal_flops.get(stage, ideal.forward() if stage == WHOLE else 0.0)
        measured = f"{base_s[stage] / stts_s[stage]:7.2f}x" if base_s[stage] > 1e-3 and stts_s[stage] > 0 else "-"
        flop_ratio = f"{flops / stts_flops:12.2f}x" if flops and stts_flops else "-"
        share = f"{base_s[stage] / total_s:.1%} / {flops / total_flops:.1%}" if flops or stage == BETWEEN else "-"
        if stage == SCORING:
            share = f"STTS: {stts_flops / total_flops:.2%} of the baseline's FLOPs"
        lines.append(
            f"  {stage:32s} {base_s[stage] * 1000:11.1f} {stts_s[stage] * 1000:8.1f} {measured:>8s} "
            f"{flop_ratio:>13s} {share:>33s}"
        )
    vit_seconds_per_flop = sum(base_s[stage] for stage in VIT_STAGES) / sum(base_flops[stage] for stage in VIT_STAGES)
    at_flop_speed = base_s[BETWEEN] + ideal_flops[SCORING] * vit_seconds_per_flop
    base_stages = [stage for stage in STAGE_FLOPS if stage != SCORING]
    at_flop_speed += sum(base_s[stage] * ideal_flops[stage] / base_flops[stage] for stage in base_stages)
    bound = total_s / at_flop_speed
    measured = total_s / stts_s[WHOLE]
    lines.append(
        f"  every stage at its FLOP speed-up: {bound:.2f}x (the whole forward's FLOP ideal: "
        f"{total_flops / ideal.forward():.2f}x); measured {measured:.2f}x = {measured / bound:.0%} of it"
    )
    return lines
