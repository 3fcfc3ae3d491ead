"""The video-QA report: the machine, `video_qa.md` (tables, the scorer's health, the claims) and `video_qa.png`."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch
import transformers

from benchmarks.common import cpu_model, pyplot, render_report, save_figure, table_header, table_row, write_report
from benchmarks.video_qa.data import KINDS, TASKS
from benchmarks.video_qa.rows import REGIMES, ROWS, TRAINING_VARIANTS
from benchmarks.video_qa.train import TEXT_LAYERS, TEXT_WIDTH


def machine() -> str:
    """The CPU model, core count, torch and transformers versions."""
    return (
        f"{cpu_model(platform.machine())} CPU ({platform.machine()}), {os.cpu_count()} cores, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )


def percent(value: float | None) -> str:
    """A percentage with one decimal, "-" for None."""
    return "-" if value is None else f"{value:.1f}"


def markdown(report: dict[str, Any]) -> str:
    """`video_qa.md`: the settings, the tables (one per task, both regimes side by side), the scorer's health and the
    claims.

    Args:
        report (`dict[str, Any]`): the contents of `video_qa.json`.

    Returns:
        `str`: the markdown.
    """
    by_key = {(s["name"], s["regime"]): s for s in report["summary"]}
    lines = settings_lines(report)
    lines += glance_table(by_key)
    for task in TASKS:
        lines += task_table(task, by_key)
    lines += kept_table(report["summary"]) + health_table(report["summary"]) + claims_table(report["claims"])
    return "\n".join(lines) + "\n"


def settings_lines(report: dict[str, Any]) -> list[str]:
    """How the report was made: the evaluation, the tasks, the model and its training."""
    summary, train = report["summary"], report["train"]
    seeds = sorted({seed for s in summary for seed in s["seeds"]})
    split = "test" if report["eval_split"] == "test" else "VALIDATION (not the reported test set)"
    quick = " (--quick: a smoke test, not the benchmark)" if report["quick"] else ""
    return [
        f"Synthetic video QA, 4 questions with 4 answers each (chance 25%), {train['eval_size']} held-out {split} "
        f"clips per task, generated apart from every training clip. Seeds {', '.join(map(str, seeds))}; "
        f"{report['machine']}, {report['workers']} worker(s); {report['seconds'] / 60:.1f} min in all{quick}.",
        "",
        "- **static**: 16 frames of 84x84 px (8 temporal slots x 9 units) of a static textured scene with sensor "
        "noise; after the first slot a square appears (what colour?), moves out of the centre (which direction?), "
        "flashes (how many?), appears in a corner (which one?). What changes is exactly what answers: the "
        "training-free rule's best case.",
        "- **distractor**: the same questions about 14 px squares, and 4 cells showing a new random picture every "
        "frame (screens): they change more than the answer does, so at 50% a rule that keeps what changes most "
        "must drop some of the answer. The learned scorer's reason to exist.",
        "- **long** (test-time scaling): 32 frames, events on any frame, one-frame flashes. The baseline sees every "
        "2nd frame (it misses flashes on odd frames); STTS sees all 32 and prunes 50%: the same video tokens. "
        "baseline-2x sees all 32 unpruned (2x the tokens): what the base makes of the frames STTS chooses from.",
        "",
        f"Model: Qwen2.5-VL (ViT 5x64, LLM {TEXT_LAYERS}x{TEXT_WIDTH}) trained unpruned from a random init on each "
        f"task's videos (the shared init: {train['pretrain_steps']} steps on static, also used for long, "
        f"{train['distractor_pretrain_steps']} on distractor). Then every row for {train['steps']} steps (batch "
        f"{train['batch_size']}, lr {train['lr']:g}, scorer lr {train['scorer_lr']:g}, prune_layer "
        f"{train['prune_layer']}), in two regimes: **frozen**, the base model stays the init and only STTS's scorer "
        "trains (a user adding STTS to a trained VLM; the training-free rows are the init evaluated as is), and "
        "**trained**, every parameter fine-tuned with the row's pruning (the paper's setting). Accuracy in %, mean "
        "± std over seeds (a seed sets the data order, the scorer's init and the random masks). Video tokens: per "
        "video, as the LLM sees them. Recall: % of the units the question's event changes (screens excluded) that "
        "the row keeps. Subsampling keeps 1 temporal slot in 2 (50%) or 5 (80%). Ablations of STTS-50: aux-only "
        "(`key_bias=False`: no LM gradient reaches the scorer), lm-only (`aux_loss_weight=0`), mse (the paper's "
        "aux loss, `aux_loss='mse'`). The training variants, suffixes of the STTS rows: **two-phase** (trained "
        f"regime only): the row's scorer trained alone on the frozen init for {train['steps']} steps, then the base "
        f"trained with the scorer frozen for {train['steps']} steps (as many base-training steps as every other "
        "trained row, plus the scorer's phase; `STTSCallback(scorer_first_steps=...)`); **lm-bias**: trained by the "
        "LM loss alone (`aux_loss_weight=0`, `logit_penalty_weight=0.01`, which keeps the logits unsaturated) with "
        "the key bias in the LLM (`llm_key_bias_weight=1`), which compares the kept units across frames; **upper**: "
        "`aux_loss='bce_upper'` (the aux loss only pushes down scores above the unit's change and is silent on the "
        "others), both losses at their default weights; **upper-lm-bias**: the upper rows with "
        "`llm_key_bias_weight=1`; **upper-lm-bias-margin**: those with `logit_penalty_weight=0.1, "
        "logit_penalty_margin=6` (the logits held inside [-6, 6], where no score saturates); upper-aux-only rows: "
        "the upper rows without the key bias (`key_bias=False`: no LM gradient reaches the scorer).",
    ]


# The glance table's columns: (label, the task's row-name prefix, the prune percent, the STTS rows' suffix).
GLANCE_COLUMNS = (
    ("static 50%", "", 50, ""),
    ("static 80%", "", 80, ""),
    ("distractor 50%", "distractor-", 50, ""),
    ("distractor 80%", "distractor-", 80, ""),
    ("long: 2x frames, 50%", "long-", 50, "-2x"),
)

# Its lines: (label, row-name template); a cell whose row does not exist (no similarity row on long) shows "-".
GLANCE_LINES = (
    ("unpruned baseline", "{prefix}baseline"),
    ("similarity rule", "{prefix}similarity-{percent}"),
    ("random pruning", "{prefix}random-{percent}"),
    ("STTS, default", "{prefix}stts-{percent}{suffix}"),
    *((f"STTS, {variant}", f"{{prefix}}stts-{{percent}}{{suffix}}-{variant}") for variant, _, _ in TRAINING_VARIANTS),
)


def glance_table(by_key: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """Every way of training STTS against the unpruned baseline and the training-free rules, on the five settings
    the goals are about: mean accuracy over seeds (nothing if no STTS row ran).

    Args:
        by_key (`dict`): the summary by (row name, regime).

    Returns:
        `list[str]`: the lines, a blank line and the table's caption first.
    """
    lines = [
        (
            regime,
            label,
            [by_key.get((template.format(prefix=p, percent=r, suffix=x), regime)) for _, p, r, x in GLANCE_COLUMNS],
        )
        for regime in REGIMES
        for label, template in GLANCE_LINES
    ]
    lines = [(regime, label, cells) for regime, label, cells in lines if any(cells)]
    if not any(label.startswith("STTS") for _, label, _ in lines):
        return []
    return [
        "",
        "At a glance: accuracy (%, mean over seeds) of each way of training STTS, the unpruned baseline and the "
        "training-free rules, on the settings the goals are about (on the long task the baseline sees every 2nd "
        "frame and STTS every frame, pruned by half: the same tokens). Stds, recall and the other rows below.",
        "",
        *table_header("base", "rows", *(label for label, *_ in GLANCE_COLUMNS)),
        *(
            table_row(regime, label, *(percent(c and c["accuracy_mean"]) for c in cells))
            for regime, label, cells in lines
        ),
    ]


def task_table(task: str, by_key: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    """The table of one task's rows (nothing if none ran): accuracy and recall in both regimes.

    Args:
        task (`str`): a key of `TASKS`.
        by_key (`dict`): the summary by (row name, regime).

    Returns:
        `list[str]`: the lines, a blank line and the task's name first.
    """
    names = [row.name for row in ROWS.values() if row.task == task and any((row.name, r) in by_key for r in REGIMES)]
    if not names:
        return []
    lines = ["", f"**{task}**", ""]
    columns = ("frozen: accuracy", "frozen: recall", "trained: accuracy", "trained: recall")
    lines += table_header("row", "video tokens", *columns)
    for name in names:
        cells = []
        for regime in REGIMES:
            s = by_key.get((name, regime))
            cells += ["-", "-"] if s is None else [accuracy_cell(s), percent(s["recall"])]
        tokens = next(by_key[name, r]["video_tokens"] for r in REGIMES if (name, r) in by_key)
        lines.append(table_row(name, f"{tokens:.1f}", *cells))
    return lines


def accuracy_cell(summary: dict[str, Any]) -> str:
    """`mean ± std` of a row's accuracy over seeds."""
    return f"{summary['accuracy_mean']:.1f} ± {summary['accuracy_std']:.1f}"


def kept_table(summary: list[dict[str, Any]]) -> list[str]:
    """What the rows keep, by kind of unit (`KINDS`), for the rows whose runs measured it (nothing if none did)."""
    rows = [s for s in summary if s.get("kept_by_kind")]
    if not rows:
        return []
    lines = [
        "",
        "What the rows keep (% of each kind of unit after the first temporal slot, means over seeds): the answer's "
        "change (the recall column), the squares in view (units where a square the question's event drew stays, "
        "unchanged since the previous slot: it still shows the answer's colour or place), the screens, the static "
        "background.",
        "",
        *table_header("row", "regime", "answer's change", "squares in view", "screens", "static background"),
    ]
    return lines + [
        table_row(s["name"], s["regime"], *(percent(s["kept_by_kind"][kind]) for kind in KINDS)) for s in rows
    ]


def health_table(summary: list[dict[str, Any]]) -> list[str]:
    """The learned scorer's health at the end of its training, per row and regime (nothing without a scorer)."""
    health = [s for s in summary if s["saturated_fraction_last"] is not None]
    if not health:
        return []
    lines = [
        "",
        "The learned scorer over the last tenth of its training (means over seeds; two-phase rows: of the scorer's "
        "phase, the last it trains): saturated scores (within "
        "1e-4 of 0 or 1, where the sigmoid passes no gradient), the scorer's gradient norm before clipping, the "
        "aux loss.",
        "",
        *table_header("row", "regime", "saturated", "scorer grad norm", "aux loss"),
    ]
    return lines + [
        table_row(
            s["name"],
            s["regime"],
            f"{s['saturated_fraction_last']:.3f}",
            f"{s['scorer_grad_norm_last']:.2e}",
            percent(s["aux_loss_last"]) if s["aux_loss_last"] is None else format(s["aux_loss_last"], ".4f"),
        )
        for s in health
    ]


def claims_table(checks: list[dict[str, Any]]) -> list[str]:
    """Every claim, met or not in each regime with its gap in points (nothing without claims)."""
    if not checks:
        return []
    lines = ["", *table_header("claim (paper's, or this project's goal)", *REGIMES)]
    for claim in dict.fromkeys(c["claim"] for c in checks):
        cells = []
        for regime in REGIMES:
            c = next((c for c in checks if c["claim"] == claim and c["regime"] == regime), None)
            cells.append("-" if c is None else f"{'yes' if c['met'] else 'no'} ({c['gap']:+.1f} points)")
        lines.append(table_row(claim, *cells))
    return lines


# The training variant drawn next to the default: the best one measured with the base frozen (README), in its
# two-phase form with the base trained (in one phase it collapses there).
PLOTTED_VARIANT = "upper-lm-bias"


def plot(summary: list[dict[str, Any]], path: str) -> None:
    """Accuracy against the fraction of video tokens removed, one line per method (and `PLOTTED_VARIANT`), one panel
    per task and regime."""
    panels = [
        (t, r)
        for t in ("static", "distractor")
        for r in REGIMES
        if any(s["task"] == t and s["regime"] == r for s in summary)
    ]
    if not panels:
        return
    figure, axes = pyplot().subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), squeeze=False)
    for axis, (task, regime) in zip(axes[0], panels):
        in_panel = [s for s in summary if s["task"] == task and s["regime"] == regime]
        points = [s for s in in_panel if not s["options"]]
        baseline = next((s for s in points if s["method"] == "none"), None)
        variant = PLOTTED_VARIANT + ("-two-phase" if regime == "trained" else "")
        for rows, label in (
            ([s for s in points if s["method"] == "scorer"], "STTS, default"),
            ([s for s in in_panel if s["name"].endswith(f"-{variant}")], f"STTS, {variant}"),
            ([s for s in points if s["method"] == "random"], "random"),
            ([s for s in points if s["method"] == "similarity"], "similarity"),
            ([s for s in points if s["method"] == "subsample"], "subsampling"),
        ):
            line = sorted(rows, key=lambda s: s["ratio"])
            line = ([baseline] if baseline else []) + line
            if len(line) < 2:
                continue
            axis.errorbar(
                [100 * s["ratio"] for s in line],
                [s["accuracy_mean"] for s in line],
                yerr=[s["accuracy_std"] for s in line],
                marker="o",
                capsize=3,
                label=label,
            )
        axis.axhline(25, color="grey", linestyle=":", label="chance")
        axis.set(
            xlabel="video tokens removed (%)", ylabel="test accuracy (%)", title=f"{task}, base {regime}", ylim=(0, 100)
        )
        axis.legend(fontsize=8)
    save_figure(figure, path)


def write_outputs(report: dict[str, Any], out: str) -> str:
    """Write `video_qa.json`, `video_qa.md` and `video_qa.png` into `out`.

    Args:
        report (`dict[str, Any]`): every run, the summary, the claims and the settings (`main`'s).
        out (`str`): the folder.

    Returns:
        `str`: the markdown.
    """
    return write_report(out, "video_qa", report, markdown, summary_plot)


def render(out: str) -> dict[str, Any]:
    """Rewrite `video_qa.md` and `video_qa.png` in `out` from its `video_qa.json`; returns the report read."""
    return render_report(out, "video_qa", markdown, summary_plot)[0]


def summary_plot(report: dict[str, Any], path: str) -> None:
    """`plot` of a report's summary."""
    plot(report["summary"], path)
