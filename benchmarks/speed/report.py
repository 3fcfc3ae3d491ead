"""The speed report: the machine, the tables (speed-ups, times, FLOP check), the targets, `speed.md` and `speed.png`."""

from __future__ import annotations

import itertools
import os
import platform
from typing import Any

import torch

from benchmarks.common import (
    cpu_model,
    pyplot,
    render_report,
    save_figure,
    table_header,
    table_row,
    write_report,
)
from benchmarks.speed.families import FAMILIES
from benchmarks.speed.flops import FlopCount
from benchmarks.speed.kinds import KIND_COLUMNS, KIND_TITLES, KINDS

# The command of runs whose settings do not record theirs: `benchmarks/speed.py` was a single script before it
# became the `benchmarks.speed` package (the committed speed.json is one of them).
LEGACY_COMMAND = "python benchmarks/speed.py"


def machine_name(threads: int, device: str) -> str:
    """The machine of a run: the CPU (and the GPU on CUDA), cores, torch threads and torch version.

    Args:
        threads (`int`): torch threads of the run.
        device (`str`): "cpu" or "cuda[:N]".

    Returns:
        `str`: the description the markdown states.
    """
    model_name = cpu_model(platform.processor() or platform.machine())
    if device.startswith("cuda"):
        model_name = f"{torch.cuda.get_device_name(device)} (host: {model_name})"
    return f"{model_name}, {os.cpu_count()} cores, {threads} torch threads, torch {torch.__version__}"


CASE_COLUMNS = ("frames", "prune ratio")  # the first columns of every table


def case_cells(row: dict) -> tuple[str, str]:
    """The first cells of a result row in every table (`CASE_COLUMNS`)."""
    return str(row["frames"]), f"{row['prune_ratio']:.0%}"


def speedup_cell(entry: dict[str, float]) -> str:
    """A cell `measured / ideal (fraction of ideal)` of one kind of measurement."""
    return f"{entry['speedup']:.2f}x / {entry['ideal']:.2f}x ({entry['of_ideal']:.0%})"


def round_speedups(entry: dict) -> list[float]:
    """The speed-up of every round of the round-robin (the baseline's seconds over STTS's in the same round), empty
    for rows from before the rounds were recorded. Their spread shows how noisy the cell's median is."""
    return [b / s for b, s in zip(entry.get("baseline_runs_s", []), entry.get("stts_runs_s", []))]


def round_range(entry: dict) -> str:
    """`min-max` of `round_speedups`, "-" without rounds."""
    speedups = round_speedups(entry)
    return f"{min(speedups):.2f}-{max(speedups):.2f}x" if speedups else "-"


def memory_cell(row: dict) -> str:
    """A cell `baseline -> STTS (ratio)` of the peak memory in MiB, "-" where it was not measured."""
    memory = row.get("peak_memory_mib")
    if memory is None:
        return "-"
    return f"{memory['baseline']:.0f} -> {memory['stts']:.0f} ({memory['baseline'] / memory['stts']:.2f}x)"


def scorer_shares(row: dict) -> tuple[float, float]:
    """The scoring step's time as a share of the pruned (STTS) forward and of the pruned whole-model training step
    at the row's ratio: its share of the baseline's step times the measured speed-up."""
    scorer = row["scorer"]
    return (
        scorer["forward_fraction"] * row["forward"]["speedup"],
        scorer["train_fraction"] * row["train_whole"]["speedup"],
    )


def speedup_table(rows: list[dict]) -> list[str]:
    """The speed-ups of one family: measured against ideal per kind, the peak memory and the scorer's share."""
    lines = table_header(
        *CASE_COLUMNS,
        "video tokens",
        "LLM tokens",
        *(KIND_COLUMNS[kind] for kind in KINDS),
        "peak memory, train step (MiB)",
        "scorer, share of the pruned step (fwd / train)",
    )
    for r in rows:
        forward_share, train_share = scorer_shares(r)
        lines.append(
            table_row(
                *case_cells(r),
                f"{r['video_tokens'][0]} -> {r['video_tokens'][1]}",
                f"{r['llm_tokens'][0]} -> {r['llm_tokens'][1]}",
                *(speedup_cell(r[kind]) for kind in KINDS),
                memory_cell(r),
                f"{forward_share:.1%} / {train_share:.1%}",
            )
        )
    return lines


def times_table(rows: list[dict]) -> list[str]:
    """The times of one family, baseline -> STTS per kind, with the FLOP speed-ups as executed."""
    lines = table_header(
        *CASE_COLUMNS,
        "repeats",
        *(f"{KIND_COLUMNS[kind]} (ms)" for kind in KINDS),
        "FLOP speed-up as executed (fwd / train)",
        "STTS at ratio 0 (fwd)",
        "forward, speed-up of each round (min-max)",
    )
    for r in rows:
        times = [f"{r[k]['baseline_s'] * 1000:.0f} -> {r[k]['stts_s'] * 1000:.0f}" for k in KINDS]
        executed = f"{r['forward']['executed_flops_speedup']:.2f}x / {r['train_whole']['executed_flops_speedup']:.2f}x"
        lines.append(
            table_row(
                *case_cells(r),
                str(r["repeats"]),
                *times,
                executed,
                f"{r['scorer']['ratio0_forward_overhead']:+.1%}",
                round_range(r["forward"]),
            )
        )
    return lines


def flop_check_table(rows: list[dict]) -> list[str]:
    """The analytic FLOPs of one family against `FlopCounterMode`'s counts."""
    lines = table_header(
        *CASE_COLUMNS,
        "baseline GFLOP (analytic)",
        "baseline analytic / counted",
        "STTS GFLOP ideal / as executed",
        "STTS as executed: analytic / counted",
        "scorer share of baseline FLOPs",
    )

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    for r in rows:
        base, check = FlopCount(**r["flops"]["baseline"]).forward() / 1e9, r["flop_check"]
        ideal, executed = (FlopCount(**r["flops"][k]).forward() / 1e9 for k in ("ideal", "executed"))
        lines.append(
            table_row(
                *case_cells(r),
                f"{base:.1f}",
                ratio(check["baseline_analytic_over_counted"]),
                f"{ideal:.1f} / {executed:.1f}",
                ratio(check["stts_executed_analytic_over_counted"]),
                f"{r['scorer']['flops_fraction']:.2%}",
            )
        )
    return lines


def rounds_note(entry: dict) -> str:
    """A target line's tail: the speed-ups of the single rounds, as a fraction of the ideal."""
    speedups = round_speedups(entry)
    if not speedups:
        return ""
    low, high = min(speedups) / entry["ideal"], max(speedups) / entry["ideal"]
    return f" (single rounds: {round_range(entry)}, {low:.0%}-{high:.0%} of ideal)"


def target_lines(rows: list[dict], main_ratio: float) -> list[str]:
    """The targets of the speed issue, checked on this family's rows: at 32 frames every kind within 95% of its
    FLOP ideal; at 128 frames >= 1.6x; speed-ups rising with frames; the scorer < 2% of the pruned forward."""
    main = sorted((r for r in rows if r["prune_ratio"] == main_ratio), key=lambda r: r["frames"])
    at = {r["frames"]: r for r in main}
    lines = []
    if 32 in at:
        for kind in KINDS:
            e = at[32][kind]
            verdict = "met" if e["of_ideal"] >= 0.95 else "NOT met"
            lines.append(
                f"- {KIND_TITLES[kind]} at 32 frames, {main_ratio:.0%}: {e['speedup']:.2f}x, {e['of_ideal']:.1%} of "
                f"ideal (target >= 95% of ideal): {verdict}{rounds_note(e)}"
            )
    if 128 in at:
        for kind in KINDS:
            e = at[128][kind]
            lines.append(
                f"- {KIND_TITLES[kind]} at 128 frames, {main_ratio:.0%}: {e['speedup']:.2f}x, {e['of_ideal']:.0%} of "
                f"ideal (target >= 1.6x): {'met' if e['speedup'] >= 1.6 else 'NOT met'}{rounds_note(e)}"
            )
    for kind in KINDS:
        speedups = [r[kind]["speedup"] for r in main]
        if len(speedups) > 1:
            rising = all(b >= a * 0.98 for a, b in itertools.pairwise(speedups))  # 2%: timing noise
            trend = " -> ".join(f"{s:.2f}x" for s in speedups)
            lines.append(f"- {KIND_TITLES[kind]}, rising with frames: {trend}: {'yes' if rising else 'NO'}")
    forward_shares, train_shares = zip(*(scorer_shares(r) for r in main))
    lines.append(
        f"- scorer cost at {main_ratio:.0%}, worst case: {max(forward_shares):.1%} of the pruned forward "
        f"(target < 2%): {'met' if max(forward_shares) < 0.02 else 'NOT met'}; {max(train_shares):.1%} of the pruned "
        "whole-model training step"
    )
    return lines


def markdown(results: list[dict], settings: dict[str, Any]) -> str:
    """`speed.md`: how the run was made, then per family its tables and targets.

    No title and level-4 family headings: benchmarks/readme_results.py pastes this file under README's "### Speed".

    Args:
        results (`list[dict]`): the result rows.
        settings (`dict[str, Any]`): the run's settings.

    Returns:
        `str`: the markdown.
    """
    precision = "" if settings.get("dtype", "float32") == "float32" else f" {settings['dtype']},"
    attention = settings.get("attn_implementation", "sdpa")
    precision += "" if attention == "sdpa" else f" attention {attention},"
    lines = [
        f"Machine: {settings['machine']}.{precision} Frames {settings['size']} px, prune_layer "
        f"{settings['prune_layer']}, one "
        "video per batch (text prompt + video + 2-token answer). Baseline (`disable_stts()`) and STTS alternated "
        "round-robin over the ratios of a frame count, in one process; medians of `repeats` runs after a warm-up.",
        "",
        f"Command: `{settings.get('command', LEGACY_COMMAND)} {' '.join(settings['argv'])}` "
        f"({settings['seconds'] / 60:.1f} min)"
        + "".join(
            f"; then `{settings['command']} {' '.join(run['argv'])}` ({run['seconds'] / 60:.1f} min)"
            for run in settings.get("merged", [])
        )
        + ".",
        "",
        "- Cells `measured / ideal (fraction of ideal)`: measured = baseline time / STTS time; ideal = baseline FLOPs "
        "/ STTS FLOPs from the analytic matmul count (ViT blocks before and after the prune point with attention's "
        "quadratic term over the segments actually used, connector, LLM with its causal attention, lm_head, scorer), "
        "with the kept units of a real forward. The LLM's causal attention counts the query-key pairs on and below "
        "the diagonal, which is what the causal kernel both arms run computes; the math SDPA backend computes the "
        "whole square and FlopCounterMode counts it, so the check against FlopCounterMode ('analytic / counted') adds "
        "the masked half back. 'As executed' counts what the implementation runs (LLaVA-OneVision: packed "
        "rows of the full frame length; the projector on the patches the kept tokens' pooling reads: the kept cells "
        "of an even grid, a few more on an odd one). Like FlopCounterMode, the count holds matrix products only: "
        "norms, activations, RoPE, softmax and kernel efficiency (e.g. the slow CPU Conv3d patch embedding, a fixed "
        "cost) are outside the ideal. `python -m benchmarks.speed --profile` splits a forward into its stages, "
        "each against its own FLOP speed-up.",
        "- generate: `generate(max_new_tokens=16, min_new_tokens=16, do_sample=False)`, prompt without the answer.",
        "- train, scorer only: `STTSConfig(train_base_model=False)`; the baseline is the frozen bare model "
        "back-propagating from the loss to the output of ViT block prune_layer (the path the scorer's gradient "
        "takes). train, whole model: `train_base_model=True`. Step = forward + backward + zero_grad, no optimizer.",
        "- peak memory: "
        + (
            "increase of `torch.cuda.max_memory_allocated` during the first whole-model training step in a fresh "
            "process, baseline vs STTS"
            if settings["device"].startswith("cuda")
            else "increase of the peak RSS (Linux VmHWM, reset through /proc/self/clear_refs just before; ru_maxrss "
            "elsewhere) during the first whole-model training step in a fresh process (forkserver), baseline vs STTS"
        )
        + ".",
        "- scorer: the scoring step alone (unit gathering, scorer, key bias, selection; in training also the aux "
        "loss) on block prune_layer's output, as a share of the pruned forward / of the pruned whole-model "
        "training step (with its backward) at the row's ratio. 'STTS at ratio 0' is a full STTS forward pruning "
        "nothing, against the baseline. 'Speed-up of each round': the baseline's time over STTS's in the same "
        "round of the round-robin; their spread shows how far the machine's noise moves a cell.",
        "",
    ]
    for name in dict.fromkeys(r["family"] for r in results):
        rows = [r for r in results if r["family"] == name]
        lines += [f"#### {FAMILIES[name].description}", "", *speedup_table(rows), "", "Targets:", ""]
        lines += [*target_lines(rows, settings["main_ratio"]), "", "Times, baseline -> STTS:", ""]
        lines += [*times_table(rows), "", "FLOPs (FlopCounterMode with the math SDPA backend):", ""]
        lines += [*flop_check_table(rows), ""]
    return "\n".join(lines)


def plot_panel(axis: Any, rows: list[dict], kind: str) -> None:
    """One family's speed-up of one kind vs frames: per ratio, measured (solid) and ideal (dashed, same colour)."""
    for index, ratio in enumerate(sorted({r["prune_ratio"] for r in rows})):
        points = sorted((r["frames"], r[kind]["speedup"], r[kind]["ideal"]) for r in rows if r["prune_ratio"] == ratio)
        frames, measured, ideal = zip(*points)
        axis.plot(frames, measured, "o-", color=f"C{index}", label=f"{ratio:.0%} measured")
        axis.plot(frames, ideal, "--", color=f"C{index}", marker="x", alpha=0.7, label=f"{ratio:.0%} ideal")
    ticks = sorted({r["frames"] for r in rows})
    axis.set_xscale("log", base=2)
    axis.set_xticks(ticks, [str(t) for t in ticks])
    axis.axhline(1.0, color="grey", linewidth=0.5)
    axis.set_title(f"{rows[0]['family']}: {KIND_TITLES[kind]}", fontsize=9)
    axis.set_xlabel("frames")
    axis.set_ylabel("speed-up")
    axis.grid(alpha=0.3)


def plot(results: list[dict], path: str) -> None:
    """Speed-up vs frames, a row of panels per family, a panel per measurement kind."""
    families = list(dict.fromkeys(r["family"] for r in results))
    figure, axes = pyplot().subplots(
        len(families), len(KINDS), figsize=(4 * len(KINDS), 3.4 * len(families)), squeeze=False
    )
    for row_axes, name in zip(axes, families):
        for axis, kind in zip(row_axes, KINDS):
            plot_panel(axis, [r for r in results if r["family"] == name], kind)
        row_axes[0].legend(fontsize=7)
    save_figure(figure, path)


def write_outputs(results: list[dict], settings: dict[str, Any], out: str) -> str:
    """Write `speed.json`, `speed.md` and `speed.png` into `out`.

    Args:
        results (`list[dict]`): the result rows (`benchmark_family`'s).
        settings (`dict[str, Any]`): the run's settings (machine, size, command line, ...).
        out (`str`): the folder.

    Returns:
        `str`: the markdown.
    """
    data = {"settings": settings, "results": results}
    return write_report(out, "speed", data, data_markdown, data_plot)


def render(out: str) -> str:
    """Rewrite `speed.md` and `speed.png` in `out` from its `speed.json`; returns the markdown."""
    return render_report(out, "speed", data_markdown, data_plot)[1]


def data_markdown(data: dict[str, Any]) -> str:
    """`markdown` of the contents of `speed.json`."""
    return markdown(data["results"], data["settings"])


def data_plot(data: dict[str, Any], path: str) -> None:
    """`plot` of the contents of `speed.json`."""
    plot(data["results"], path)
