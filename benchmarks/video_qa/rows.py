"""The rows of the tables (`ROWS`: a method at a prune ratio on a task, the ablations) and the batch a row's model
sees (`build_batch`: frame strides and temporal-slot subsampling applied)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Qwen2_5_VLConfig

from benchmarks.video_qa.data import (
    PIXEL_MEAN,
    PIXEL_STD,
    PREFIX,
    SLOT,
    Clip,
    answer_token,
    question_tokens,
)
from stts_adapter.testing import Sample, build_qwen_batch

REGIMES = ("frozen", "trained")


@dataclass(frozen=True)
class Row:
    """One line of the table.

    Args:
        name (`str`): its label (unique over all tasks).
        method (`str`): "none" (unpruned), "scorer", "random", "similarity" (STTS methods) or "subsample" (uniform
            temporal-slot subsampling).
        ratio (`float`): fraction of video tokens removed (the prune ratio, or the subsampling's target).
        task (`str`): the video set, a key of `TASKS`.
        frame_stride (`int`): keep every n-th frame of the video before anything else (the long set's baseline
            samples half the frames, as a fixed frame budget does).
        options (`tuple`): `(field, value)` pairs overriding `STTSConfig` defaults: the ablations.
        two_phase (`bool`): trained regime only: the scorer alone on the frozen base for the row's steps, then the base
            alone with the scorer frozen for as many steps (`STTSModel.set_trainable`, as
            `STTSCallback(scorer_first_steps=...)` does).
    """

    name: str
    method: str
    ratio: float = 0.0
    task: str = "static"
    frame_stride: int = 1
    options: tuple[tuple[str, Any], ...] = ()
    two_phase: bool = False

    @property
    def regimes(self) -> tuple[str, ...]:
        """A two-phase row runs in the trained regime only: in the frozen regime it is its one-phase row (its
        second phase, the base's, would train nothing)."""
        return ("trained",) if self.two_phase else REGIMES

    @property
    def prunes(self) -> bool:
        """Whether the row wraps the model with STTS."""
        return self.method in ("scorer", "random", "similarity")

    @property
    def trains_in_frozen_regime(self) -> bool:
        """Only a learned scorer has something to train when the base model is frozen."""
        return self.method == "scorer"

    @property
    def slot_stride(self) -> int:
        """Subsampling keeps 1 temporal slot in this many: 1 / (1 - ratio), rounded (50% -> 2, 80% -> 5)."""
        return round(1 / (1 - self.ratio)) if self.method == "subsample" else 1


ABLATIONS = (
    ("aux-only", (("key_bias", False),)),  # no soft key bias: the LM loss cannot reach the scorer
    ("lm-only", (("aux_loss_weight", 0.0),)),  # no temporal aux loss: the scorer learns from the answer only
    ("mse", (("aux_loss", "mse"),)),  # the paper's aux loss (MSE of the sigmoid against 1 - cos)
)


# The scorer trained by the LM loss alone with two LM paths: the soft key bias in the ViT, and the straight-through key
# bias on the kept video tokens in every LLM layer (`llm_key_bias_weight`), which compares units across frames under
# the pruned set. Weight 1 over 0.3 on the validation split (seeds 0 / 1, base frozen; docs/scorer-findings.md).
# The logit penalty keeps the logits in the sigmoid's slope (0.01 over 0.001 on the validation split, seeds 0 / 1,
# distractor task).
LM_BIAS = (("aux_loss_weight", 0.0), ("logit_penalty_weight", 0.01), ("llm_key_bias_weight", 1.0))


# The change as an upper bound of the score (`aux_loss="bce_upper"`): the aux loss pushes down what did not change
# and is silent on what did. No logit penalty: with it (0.01) the distractor task fell to 53 / 58 (validation split,
# seeds 0 / 1, base frozen), and so did a floor that held scores above 0.01 (76 / 77); holding the logits inside
# [-6, 6] with the margin penalty (0.1) lost to it on the previous table (docs/scorer-findings.md).
UPPER = (("aux_loss", "bce_upper"),)

# bce_upper and the LLM key bias together: the aux loss drops what repeats, the LM loss ranks the rest across frames
# (validation split, seeds 0-3, base frozen: the best of the scorers measured there; docs/scorer-findings.md).
UPPER_LM_BIAS = (*UPPER, ("llm_key_bias_weight", 1.0))

# The same with its logits held inside [-6, 6] by the margin logit penalty (`logit_penalty_margin`), so that no score
# saturates and the two losses cannot grow the scale against each other (unbounded, the aux loss reaches the hundreds
# on the static task). Weight 0.1 and margin 6 as chosen earlier for bce_upper alone; on the validation split (seeds
# 0 / 1, base frozen) 0 saturated scores, distractor STTS-50 95.7 / 95.7 and static STTS-50 89.8 / 89.8 against
# 96.1 / 94.5 and 89.5 / 89.1 unbounded, STTS-80 79.7 / 79.7 and 77.0 / 84.8 against 85.5 / 89.5 and 81.2 / 86.7;
# a plain penalty of 0.01 was worse (distractor STTS-80 65.6 / 73.8, static STTS-80 87.5 / 60.5).
UPPER_LM_BIAS_MARGIN = (*UPPER_LM_BIAS, ("logit_penalty_weight", 0.1), ("logit_penalty_margin", 6.0))

# STTS's training variants: (row-name suffix, `STTSConfig` options, trained in two phases), in the tables' order.
TRAINING_VARIANTS = (
    ("lm-bias", LM_BIAS, False),
    ("lm-bias-two-phase", LM_BIAS, True),
    ("upper", UPPER, False),
    ("upper-two-phase", UPPER, True),
    ("upper-lm-bias", UPPER_LM_BIAS, False),
    ("upper-lm-bias-two-phase", UPPER_LM_BIAS, True),
    ("upper-lm-bias-margin", UPPER_LM_BIAS_MARGIN, False),
    ("upper-lm-bias-margin-two-phase", UPPER_LM_BIAS_MARGIN, True),
)

# The upper rows' ablation: no soft key bias, so no LM gradient reaches the scorer (does the LM loss rank anything?).
UPPER_AUX_ONLY = (*UPPER, ("key_bias", False))


def task_rows(task: str, prefix: str, ablations: bool) -> list[Row]:
    """Baseline, STTS, random, similarity and subsampling at 50% and 80% of one task, STTS's training variants, and
    with `ablations` the STTS-50 ablations and the upper rows' aux-only ablation."""
    rows = [Row(f"{prefix}baseline", "none", task=task)]
    for method, label in (
        ("scorer", "stts"),
        ("random", "random"),
        ("similarity", "similarity"),
        ("subsample", "subsample"),
    ):
        rows += [Row(f"{prefix}{label}-{percent}", method, percent / 100, task) for percent in (50, 80)]
    rows += [
        Row(f"{prefix}stts-{percent}-{suffix}", "scorer", percent / 100, task, options=options, two_phase=two_phase)
        for suffix, options, two_phase in TRAINING_VARIANTS
        for percent in (50, 80)
    ]
    if ablations:
        rows += [Row(f"{prefix}stts-50-{name}", "scorer", 0.5, task, options=options) for name, options in ABLATIONS]
        rows += [
            Row(f"{prefix}stts-{percent}-upper-aux-only", "scorer", percent / 100, task, options=UPPER_AUX_ONLY)
            for percent in (50, 80)
        ]
    return rows


ROWS = {
    row.name: row
    for row in (
        *task_rows("static", "", ablations=False),
        *task_rows("distractor", "distractor-", ablations=True),
        Row("long-baseline", "none", task="long", frame_stride=2),
        # Every frame, unpruned (2x the baseline's tokens): what the base makes of the frames STTS-2x chooses from.
        Row("long-baseline-2x", "none", task="long"),
        Row("long-stts-50-2x", "scorer", 0.5, task="long"),
        *(
            Row(f"long-stts-50-2x-{suffix}", "scorer", 0.5, task="long", options=options, two_phase=two_phase)
            for suffix, options, two_phase in TRAINING_VARIANTS
        ),
    )
}


QUICK_ROWS = ("baseline", "stts-50")


# The picture of kept units: STTS-50 on the static and on the distractor task, seed 0, base frozen.
PICTURE_ROWS = {"stts-50": "kept_units.png", "distractor-stts-50": "kept_units_distractor.png"}


def view(video: torch.Tensor, row: Row) -> tuple[torch.Tensor, float]:
    """The frames `row` gives the model and the seconds one temporal slot of them spans (for M-RoPE time).

    One temporal slot of the full video spans 1 s.
    """
    video = video[:: row.frame_stride]
    slots = video.reshape(-1, SLOT, *video.shape[1:])[:: row.slot_stride]
    return slots.flatten(0, 1), float(row.frame_stride * row.slot_stride)


def kept_slots(slots: int, row: Row) -> torch.Tensor:
    """`(slots,)` bool: the temporal slots of the full video that subsampling keeps."""
    keep = torch.zeros(slots, dtype=torch.bool)
    keep[:: row.slot_stride] = True
    return keep


def build_batch(config: Qwen2_5_VLConfig, clips: Sequence[Clip], row: Row) -> dict[str, torch.Tensor]:
    """The processor-faithful batch of `clips` as `row` sees them (left padding, labels on the answer only)."""
    samples, seconds = [], 1.0
    for clip in clips:
        frames, seconds = view(clip.video, row)
        samples.append(
            Sample(
                video=(frames - PIXEL_MEAN) / PIXEL_STD,
                prefix=PREFIX,
                suffix=question_tokens(clip.question),
                answer=[answer_token(clip.question, clip.answer)],
            )
        )
    batch = build_qwen_batch(config, samples, padding_side="left")
    batch["second_per_grid_ts"] = torch.full((len(clips),), seconds)
    return batch
