"""The temporal auxiliary loss: a unit's score should predict how much it changed since the previous frame."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def previous_frame_change(unit_patches: torch.Tensor, previous_unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """1 - cosine between each unit and the same unit in the previous frame of its video.

    A unit is represented by its concatenated, L2-normalised patch vectors. Blank (all-zero) patches normalise to
    zero vectors and give a cosine of 0, never NaN; huge values do not overflow.

    Args:
        unit_patches (`torch.Tensor` of shape `(num_units, patches_per_unit, dim)`): unit features.
        previous_unit (`torch.Tensor` of shape `(num_units,)`): index of the predecessor, -1 for first frames.

    Returns:
        change (`torch.Tensor` of shape `(num_units,)`, float32): 1 - cosine, 1 where there is no predecessor.
        has_previous (`torch.Tensor` of shape `(num_units,)`, bool): False on first frames.
    """
    patches = unit_patches.float()
    # The float32 norm of vectors with entries >= ~1e19 overflows to inf: scale those down first. Normalising is
    # scale-invariant, so a detached scale changes neither the value nor the gradient.
    patches = patches / patches.detach().abs().amax(dim=-1, keepdim=True).clamp_min(1.0)
    units = F.normalize(patches, dim=-1, eps=1e-6).flatten(1)  # (U, P * D)
    has_previous = previous_unit >= 0
    previous = units[previous_unit.clamp(min=0)]
    cosine = F.cosine_similarity(units, previous, dim=-1, eps=1e-6)
    change = torch.where(has_previous, 1.0 - cosine, torch.ones_like(cosine))
    return change, has_previous


def temporal_aux_loss(
    scores: torch.Tensor, unit_patches: torch.Tensor, previous_unit: torch.Tensor, detach_target: bool = True
) -> torch.Tensor:
    """Mean squared error between a unit's raw sigmoid score and 1 - cos(unit at t-1, unit at t), over t >= 1.

    Args:
        scores (`torch.Tensor` of shape `(num_units,)`): the scorer's sigmoid outputs.
        unit_patches (`torch.Tensor` of shape `(num_units, patches_per_unit, dim)`): unit features at the scored
            block's output.
        previous_unit (`torch.Tensor` of shape `(num_units,)`): predecessor index, -1 for first frames.
        detach_target (`bool`): stop the gradient through the target (the default; ours).

    Returns:
        `torch.Tensor`: a float32 scalar; 0 (still attached to `scores`) when no video has a second frame.
    """
    features = unit_patches.detach() if detach_target else unit_patches
    change, has_previous = previous_frame_change(features, previous_unit)
    squared_error = (scores.float() - change).square()
    if not bool(has_previous.any()):
        return squared_error.sum() * 0.0
    return squared_error[has_previous].mean()
