"""`--profile`: where STTS spends its time (cProfile of the library's functions, torch.profiler's aten ops), against
the bare model."""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
from collections.abc import Callable

from benchmarks.speed.benchmark import new_model
from benchmarks.speed.families import Family
from benchmarks.speed.measure import alternate, bare, forward_step, rewrap, train_step

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
        base_s, (stts_s,) = alternate(bare(model, step), [step], args.repeats)
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
    model.unload()
