"""The runs summarised: means and stds over seeds of every row and regime, and the paper's claims and this project's
goals checked on them."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from benchmarks.video_qa.rows import REGIMES, TRAINING_VARIANTS, Row


def mean_of(runs: list[dict[str, Any]], key: str) -> float | None:
    """Mean of `key` over the runs that have it, None if none has."""
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.mean(values) if values else None


def kept_by_kind(runs: list[dict[str, Any]]) -> dict[str, float | None] | None:
    """Mean over the runs that measured it (runs made before it was measured did not) of each kind's kept %."""
    measured = [r["kept_by_kind"] for r in runs if r.get("kept_by_kind")]
    if not measured:
        return None
    return {kind: mean_of(measured, kind) for kind in measured[0]}


def summarize(results: list[dict[str, Any]], rows: Sequence[Row]) -> list[dict[str, Any]]:
    """Mean and std over seeds of every row in every regime it ran in."""
    summary = []
    for row in rows:
        for regime in REGIMES:
            runs = [r for r in results if r["row"] == row.name and r["regime"] == regime]
            if not runs:
                continue
            accuracies = [r["accuracy"] for r in runs]
            types = runs[0]["accuracy_per_type"]
            summary.append(
                {
                    **asdict(row),
                    "regime": regime,
                    "seeds": [r["seed"] for r in runs],
                    "accuracy_mean": statistics.mean(accuracies),
                    "accuracy_std": statistics.stdev(accuracies) if len(runs) > 1 else 0.0,
                    "accuracy_per_type": {q: statistics.mean(r["accuracy_per_type"][q] for r in runs) for q in types},
                    "video_tokens": statistics.mean(r["video_tokens"] for r in runs),
                    **{
                        key: mean_of(runs, key)
                        for key in ("recall", "saturated_fraction_last", "scorer_grad_norm_last", "aux_loss_last")
                    },
                    "kept_by_kind": kept_by_kind(runs),
                }
            )
    return summary


# The goals a variant of STTS's training (its rows' name suffix, e.g. "lm-penalty") is held to, as in `CLAIMS`.
VARIANT_GOALS = (
    ("STTS-50% within 1 point of the baseline", "stts-50", "baseline", -1.0, True),
    ("STTS-50% >= similarity-50%", "stts-50", "similarity-50", 0.0, True),
    ("STTS-80% >= similarity-80% - 1", "stts-80", "similarity-80", -1.0, True),
    ("STTS-80% >= random-80% + 10", "stts-80", "random-80", 10.0, True),
    ("distractors: STTS-50% >= similarity-50% + 5", "distractor-stts-50", "distractor-similarity-50", 5.0, True),
    ("test-time scaling (STTS, 2x frames, 50%) beats the baseline", "long-stts-50-2x", "long-baseline", 0, False),
)


# The row-name suffixes of STTS's training variants.
VARIANTS = tuple(suffix for suffix, _, _ in TRAINING_VARIANTS)


def variant_claims(variant: str) -> list[tuple[str, str, str, float, bool]]:
    """`VARIANT_GOALS` for the rows of `variant` (named `<row>-<variant>`), labelled `<variant>: <goal>`.

    Args:
        variant (`str`): the rows' name suffix, e.g. "lm-penalty".

    Returns:
        `list[tuple[str, str, str, float, bool]]`: claims as in `CLAIMS`.
    """
    return [
        (f"{variant}: {goal}", f"{row}-{variant}", other, margin, inclusive)
        for goal, row, other, margin, inclusive in VARIANT_GOALS
    ]


# (claim, row, other row, margin: met when accuracy(row) - accuracy(other) > margin, or >= when `inclusive`)
CLAIMS = (
    ("paper: STTS-50% within 1 point of the baseline", "stts-50", "baseline", -1.0, True),
    ("paper: STTS beats random at 50%", "stts-50", "random-50", 0.0, False),
    ("paper: STTS beats random at 80%", "stts-80", "random-80", 0.0, False),
    ("paper: STTS beats frame subsampling at 50%", "stts-50", "subsample-50", 0.0, False),
    ("paper: STTS beats frame subsampling at 80%", "stts-80", "subsample-80", 0.0, False),
    (
        "paper: test-time scaling (STTS, 2x frames, 50%) beats the baseline",
        "long-stts-50-2x",
        "long-baseline",
        0,
        False,
    ),
    ("goal: STTS-50% >= similarity-50%", "stts-50", "similarity-50", 0.0, True),
    ("goal: STTS-80% >= similarity-80% - 1", "stts-80", "similarity-80", -1.0, True),
    ("goal: STTS-80% >= random-80% + 10", "stts-80", "random-80", 10.0, True),
    ("goal: distractors: STTS-50% >= similarity-50% + 5", "distractor-stts-50", "distractor-similarity-50", 5.0, True),
    *(claim for variant in VARIANTS for claim in variant_claims(variant)),
)


def claims(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The paper's claims and this project's goals, checked on the means of each regime."""
    accuracy = {(s["name"], s["regime"]): s["accuracy_mean"] for s in summary}
    checks = []
    for claim, row, other, margin, inclusive in CLAIMS:
        for regime in REGIMES:
            if (row, regime) in accuracy and (other, regime) in accuracy:
                gap = accuracy[row, regime] - accuracy[other, regime]
                met = gap >= margin if inclusive else gap > margin
                checks.append({"claim": claim, "regime": regime, "met": met, "gap": gap})
    return checks
