"""The temporal auxiliary loss: a unit's score should predict how much it changed since the previous frame."""

from __future__ import annotations

import torch
import torch.nn.functional as F

AUX_LOSSES = ("bce", "mse", "bce_upper")
BCE_TARGET_MARGIN = 1e-2
"""The "bce" target is clamped to [margin, 1 - margin]: its optimal logits stay within +-6.9 (scores are never
pushed into the sigmoid's flat tails, where the soft key bias would pass them no LM gradient), while every unit
that changes by more than 0.1% keeps its own target."""


def previous_frame_change(unit_patches: torch.Tensor, previous_unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1 - cosine between each unit and the same unit in the previous frame of its video.

    A unit is represented by its patch vectors concatenated into one vector (the paper's and the reference code's
    `compute_cosine_sims`), so a patch with large activations weighs more than a faint one. Blank (all-zero) units
    give a cosine of 0, never NaN; huge values do not overflow.

    Args:
        unit_patches (`torch.Tensor` of shape `(num_units, patches_per_unit, dim)`): unit features (zeros in the
            padding slots of units smaller than the largest).
        previous_unit (`torch.Tensor` of shape `(num_units,)`): index of the predecessor, -1 for first frames.

    Returns:
        change (`torch.Tensor` of shape `(num_units,)`, float32): 1 - cosine, in [0, 2]; 1 where there is no
            predecessor.
        has_previous (`torch.Tensor` of shape `(num_units,)`, bool): False on first frames.
    """
    units = unit_patches.float().flatten(1)  # (U, P * D)
    # The float32 norm of vectors with entries >= ~1e19 overflows to inf: scale those down first. The cosine is
    # scale-invariant, so a detached scale changes neither the value nor the gradient.
    units = units / units.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
    units = F.normalize(units, dim=-1, eps=1e-6)
    has_previous = previous_unit >= 0
    previous = units[previous_unit.clamp(min=0)]
    cosine = (units * previous).sum(-1).clamp(-1.0, 1.0)
    change = torch.where(has_previous, 1.0 - cosine, torch.ones_like(cosine))
    return change, has_previous


def temporal_aux_loss(
    logits: torch.Tensor,
    unit_patches: torch.Tensor,
    previous_unit: torch.Tensor,
    detach_target: bool = True,
    kind: str = "bce",
) -> torch.Tensor:
    """How far each unit's score is from 1 - cos(unit at t-1, unit at t), averaged over the units of frames t >= 1.

    Two forms:

    - `"bce"` (the default, ours): binary cross-entropy on the logits against `clamp(1 - cos, 0.01, 0.99)`. Its
      gradient on a logit is `sigmoid(logit) - target`, so it never vanishes while a score is wrong and stops
      pushing once the score reaches its target: the logits stay finite (the optimum lies within +-4.6) and the
      scorer keeps learning.
    - `"mse"` (the paper): `(sigmoid(logit) - (1 - cos))^2`. The target is nearly binary (static units ~0, changing
      units ~1 and often above 1, where the cosine is negative), so the loss drives the logits towards +-infinity;
      the sigmoid saturates and the gradient it passes back vanishes within a few dozen steps.
    - `"bce_upper"` (ours): the change is an upper bound of the score, not its target. The "bce" loss minus its
      minimum, only where the score is above the clamped target (the KL divergence from the target to the score
      there, 0 below it): a unit that did not change is pushed down (it repeats the previous frame), while on the
      units that changed the loss is silent. Content that changes without answering anything (a screen, flicker)
      is then not taught to score high. (Its scorer, pushed down on the static background, learns to drop what
      looks like it: the README's upper and upper-aux-only rows.)

    Args:
        logits (`torch.Tensor` of shape `(num_units,)`): the scorer's logits (before the sigmoid).
        unit_patches (`torch.Tensor` of shape `(num_units, patches_per_unit, dim)`): unit features at the scored
            block's output.
        previous_unit (`torch.Tensor` of shape `(num_units,)`): predecessor index, -1 for first frames.
        detach_target (`bool`): stop the gradient through the target (the default; ours).
        kind (`str`): `"bce"`, `"mse"` or `"bce_upper"`.

    Returns:
        `torch.Tensor`: a float32 scalar; 0 (still attached to `logits`) when no video has a second frame.
    """
    if kind not in AUX_LOSSES:
        raise ValueError(f"Unknown auxiliary loss {kind!r}: expected one of {AUX_LOSSES}.")
    features = unit_patches.detach() if detach_target else unit_patches
    change, has_previous = previous_frame_change(features, previous_unit)
    logits = logits.float()
    if kind in ("bce", "bce_upper"):
        target = change.clamp(BCE_TARGET_MARGIN, 1.0 - BCE_TARGET_MARGIN)
        per_unit = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        if kind == "bce_upper":
            # Minus the minimum (the target's entropy, at score == target): continuous where the loss starts.
            entropy = F.binary_cross_entropy_with_logits(torch.logit(target), target, reduction="none")
            per_unit = torch.where(torch.sigmoid(logits) > target, per_unit - entropy, torch.zeros_like(per_unit))
    else:
        per_unit = (torch.sigmoid(logits) - change).square()
    if not bool(has_previous.any()):
        return per_unit.sum() * 0.0
    return per_unit[has_previous].mean()


def logit_penalty(logits: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """mean(max(|logit| - margin, 0)^2): the scale penalty on the scorer's logits (ours).

    With `margin=0` it is mean(logit^2), which pulls every logit towards 0, the units that matter included. With a
    margin it is silent inside [-margin, margin] and only stops the logits from leaving it; a margin below ~9.2 keeps
    every score off the sigmoid's flat tails (`STTSReport.saturated_fraction`). (With `aux_loss="bce_upper"`, whose
    scorer separates the units by growing the logits' scale, a bound costs accuracy: the README's upper-margin rows.)

    Args:
        logits (`torch.Tensor` of shape `(num_units,)`): the scorer's logits.
        margin (`float`): half-width of the penalty-free band, >= 0.

    Returns:
        `torch.Tensor`: a float32 scalar.
    """
    return F.relu(logits.float().abs() - margin).square().mean()
