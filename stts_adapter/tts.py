"""Test-time scaling: spend a fixed video-token budget on more frames, pruned (the paper's point: at the same token
count, 2x frames at 50% sees short events that 1x frames miss).

The counts follow STTS's own budget rule exactly (`selection.pruned_unit_counts`): a video of `slots` temporal slots
of `units_per_slot` units loses floor(prune_ratio x units), never its first slot.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .selection import VideoLayout, pruned_unit_counts


@dataclass(frozen=True)
class FramePlan:
    """How to sample a video for a token budget.

    Attributes:
        frames (`int`): frames to sample.
        prune_ratio (`float`): the STTS ratio to run them at (`model.set_prune_ratio`).
        video_tokens (`int`): the video tokens the LLM then sees (<= the budget).
    """

    frames: int
    prune_ratio: float
    video_tokens: int


def kept_video_tokens(frames: int, units_per_slot: int, prune_ratio: float, frames_per_slot: int = 1) -> int:
    """Video tokens the LLM sees for `frames` frames at `prune_ratio` (STTS's budget rule, first slot kept).

    Args:
        frames (`int`): sampled frames.
        units_per_slot (`int`): LLM tokens of one temporal slot before pruning (e.g. 81 for Molmo2, (H/28)*(W/28) for
            Qwen2.5-VL).
        prune_ratio (`float`): in [0, 1).
        frames_per_slot (`int`): frames per temporal slot (2 for the Qwen-VL family, else 1).

    Returns:
        `int`
    """
    slots = math.ceil(frames / frames_per_slot)
    layout = VideoLayout(frames_per_video=(slots,), units_per_frame=(units_per_slot,), patches_per_unit=1)
    return slots * units_per_slot - pruned_unit_counts(layout, prune_ratio)[0]


def frames_for_budget(
    token_budget: int,
    units_per_slot: int,
    prune_ratio: float = 0.5,
    frames_per_slot: int = 1,
    max_frames: int | None = None,
) -> FramePlan:
    """The most frames whose pruned video fits in `token_budget` video tokens.

    Args:
        token_budget (`int`): video tokens the LLM may see per video (e.g. what the unpruned model sees at its usual
            frame count: `frames x units_per_slot / frames_per_slot`).
        units_per_slot (`int`): LLM tokens of one temporal slot before pruning.
        prune_ratio (`float`): the ratio to prune at.
        frames_per_slot (`int`): frames per temporal slot (2 for the Qwen-VL family).
        max_frames (`int`, *optional*): the most frames the video has (or you want).

    Returns:
        `FramePlan`

    Raises:
        ValueError: if not even one temporal slot fits.

    Example:

        ```python
        >>> frames_for_budget(token_budget=32 * 81, units_per_slot=81, prune_ratio=0.5)  # Molmo2, 32 frames' worth
        FramePlan(frames=64, prune_ratio=0.5, video_tokens=2592)
        ```
    """
    if not 0 <= prune_ratio < 1:
        raise ValueError(f"prune_ratio={prune_ratio} must be in [0, 1).")
    if kept_video_tokens(frames_per_slot, units_per_slot, prune_ratio, frames_per_slot) > token_budget:
        raise ValueError(
            f"A budget of {token_budget} video tokens does not hold one temporal slot ({units_per_slot} tokens, "
            "never pruned): raise the budget or use smaller frames."
        )
    # Kept tokens grow with the slot count, so the largest fitting slot count is found by bisection.
    low, high = 1, max(2, math.ceil(token_budget / max(units_per_slot * (1 - prune_ratio), 1e-9)) + 2)
    if max_frames is not None:
        high = min(high, math.ceil(max_frames / frames_per_slot))
    while low < high:
        middle = (low + high + 1) // 2
        if kept_video_tokens(middle * frames_per_slot, units_per_slot, prune_ratio, frames_per_slot) <= token_budget:
            low = middle
        else:
            high = middle - 1
    frames = low * frames_per_slot if max_frames is None else min(low * frames_per_slot, max_frames)
    return FramePlan(frames, prune_ratio, kept_video_tokens(frames, units_per_slot, prune_ratio, frames_per_slot))
