"""Which units to keep: the per-video budget, the kept sets, and the score rules of the baselines.

Throughout the library a batch's video units are laid out flat, video after video, frame after frame, unit after
unit inside a frame (the order of the LLM placeholders). `VideoLayout` describes that order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from .losses import previous_frame_change


@dataclass(frozen=True)
class VideoLayout:
    """How a batch's videos split into frames and pruning units.

    Args:
        frames_per_video (`tuple[int, ...]`): frames (temporal slots for Qwen-style models) of each video.
        units_per_frame (`tuple[int, ...]`): pruning units in every frame of each video.
        patches_per_unit (`int`): ViT patches that make up one unit (one LLM token after the connector).
    """

    frames_per_video: tuple[int, ...]
    units_per_frame: tuple[int, ...]
    patches_per_unit: int

    def __post_init__(self) -> None:
        if len(self.frames_per_video) != len(self.units_per_frame):
            raise ValueError("frames_per_video and units_per_frame need one entry per video.")

    @property
    def num_videos(self) -> int:
        return len(self.frames_per_video)

    @cached_property
    def units_per_video(self) -> tuple[int, ...]:
        return tuple(t * u for t, u in zip(self.frames_per_video, self.units_per_frame))

    @property
    def num_units(self) -> int:
        return sum(self.units_per_video)

    @property
    def num_frames(self) -> int:
        return sum(self.frames_per_video)

    @cached_property
    def frame_of_unit(self) -> torch.Tensor:
        """`(num_units,)` global frame index of every unit."""
        units_of_frame = torch.tensor(_repeat(self.units_per_frame, self.frames_per_video), dtype=torch.long)
        return torch.repeat_interleave(torch.arange(self.num_frames), units_of_frame)

    @cached_property
    def previous_unit(self) -> torch.Tensor:
        """`(num_units,)` index of the same unit in the previous frame of the same video, -1 on first frames.

        Videos never pair with each other: the first frame of every video has no predecessor.
        """
        index = torch.arange(self.num_units)
        step = torch.tensor(_repeat(self.units_per_frame, self.units_per_video))  # units per frame, per unit
        previous = index - step
        return torch.where(self.is_first_frame, torch.full_like(index, -1), previous)

    @cached_property
    def is_first_frame(self) -> torch.Tensor:
        """`(num_units,)` True for the units of each video's first frame."""
        mask = torch.zeros(self.num_units, dtype=torch.bool)
        for start, per_frame in zip(self.video_offsets[:-1], self.units_per_frame):
            mask[start : start + per_frame] = True
        return mask

    @cached_property
    def video_offsets(self) -> tuple[int, ...]:
        """Start of each video's units in the flat layout, plus the total at the end."""
        return tuple(int(x) for x in torch.tensor((0, *self.units_per_video)).cumsum(0))

    def split(self, per_unit: torch.Tensor) -> list[torch.Tensor]:
        """Split a `(num_units, ...)` tensor into one `(frames, units_per_frame, ...)` tensor per video."""
        chunks = per_unit.split(list(self.units_per_video))
        return [c.reshape(t, u, *c.shape[1:]) for c, t, u in zip(chunks, self.frames_per_video, self.units_per_frame)]


def _repeat(values: tuple[int, ...], counts: tuple[int, ...]) -> list[int]:
    return [v for v, c in zip(values, counts) for _ in range(c)]


def pruned_unit_counts(layout: VideoLayout, prune_ratio: float, keep_first_frame: bool = True) -> list[int]:
    """Units removed from each video: floor(prune_ratio x units), clamped so the first frame stays whole.

    Args:
        layout (`VideoLayout`): the batch's videos.
        prune_ratio (`float`): fraction of each video's units to remove.
        keep_first_frame (`bool`): protect the first frame's units.

    Returns:
        `list[int]`: units pruned per video.
    """
    counts = []
    for n_units, per_frame in zip(layout.units_per_video, layout.units_per_frame):
        # The epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 from flooring to 28.
        budget = math.floor(prune_ratio * n_units + 1e-9)
        prunable = n_units - per_frame if keep_first_frame else n_units - 1  # a video never loses everything
        counts.append(max(0, min(budget, prunable)))
    return counts


def select_units(
    scores: torch.Tensor, layout: VideoLayout, prune_ratio: float, keep_first_frame: bool = True
) -> torch.Tensor:
    """Keep the highest-scoring units of every video, across all of its frames (a hard sort, no gradient).

    Among equal scores the earlier units are pruned first, so the kept set is deterministic.

    Args:
        scores (`torch.Tensor` of shape `(num_units,)`): higher = keep.
        layout (`VideoLayout`): the batch's videos.
        prune_ratio (`float`): fraction of each video's units to remove.
        keep_first_frame (`bool`): protect each video's first frame.

    Returns:
        `torch.Tensor` of shape `(num_units,)`, bool: the keep mask.
    """
    scores = scores.detach().float()
    prunable = (
        ~layout.is_first_frame.to(scores.device) if keep_first_frame else torch.ones_like(scores, dtype=torch.bool)
    )
    keep = torch.ones(layout.num_units, dtype=torch.bool, device=scores.device)
    counts = pruned_unit_counts(layout, prune_ratio, keep_first_frame)
    for start, end, n_pruned in zip(layout.video_offsets[:-1], layout.video_offsets[1:], counts):
        if n_pruned == 0:
            continue
        candidates = start + torch.nonzero(prunable[start:end]).squeeze(1)  # protected units are never candidates
        order = torch.sort(scores[candidates], stable=True).indices
        keep[candidates[order[:n_pruned]]] = False
    return keep


def random_scores(layout: VideoLayout, seed: int | None, device: torch.device | str = "cpu") -> torch.Tensor:
    """Scores of the random baseline.

    Args:
        layout (`VideoLayout`): the batch's videos.
        seed (`int`, *optional*): None draws from torch's global RNG (training); an integer seeds every video's
            draw the same way, so a video's kept set does not depend on the rest of the batch (evaluation).
        device: where the scores live.

    Returns:
        `torch.Tensor` of shape `(num_units,)` in [0, 1).
    """
    if seed is None:
        return torch.rand(layout.num_units, device=device)
    draws = [torch.rand(n, generator=torch.Generator().manual_seed(seed)) for n in layout.units_per_video]
    return torch.cat(draws).to(device)


def similarity_scores(unit_patches: torch.Tensor, layout: VideoLayout) -> torch.Tensor:
    """Scores of the training-free similarity rule (as in EVS): how much a unit changed since the previous frame.

    The units most similar to the same unit in the previous frame get the lowest scores and are pruned first.
    First frames score 1 (they are protected anyway).

    Args:
        unit_patches (`torch.Tensor` of shape `(num_units, patches_per_unit, dim)`): unit features.
        layout (`VideoLayout`): the batch's videos.

    Returns:
        `torch.Tensor` of shape `(num_units,)`.
    """
    change, has_previous = previous_frame_change(unit_patches, layout.previous_unit.to(unit_patches.device))
    return torch.where(has_previous, change, torch.ones_like(change))


def scatter_kept(kept_rows: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The rows computed for the kept entries only, put back in the full layout, zeros where `keep` is False.

    Connectors that run on kept units only hand their output back this way to code that expects every unit (the
    model's own reordering, the placeholder bookkeeping); the zero rows are dropped later.

    Args:
        kept_rows (`torch.Tensor` of shape `(keep.sum(), dim)`): one row per True entry of `keep`, in order.
        keep (`torch.Tensor` of shape `(num_entries,)`, bool).

    Returns:
        `torch.Tensor` of shape `(num_entries, dim)`.
    """
    kept = torch.nonzero(keep.to(kept_rows.device)).squeeze(1)
    return kept_rows.new_zeros(len(keep), kept_rows.shape[-1]).index_copy(0, kept, kept_rows)


def apply_to_kept(
    function: Callable[[torch.Tensor], torch.Tensor], rows: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """`function` (a connector that maps every row on its own) on the kept rows only, scattered back with
    `scatter_kept`; on every row when all are kept.

    Args:
        function (`Callable`): `(n, dim) -> (n, out_dim)`, row by row (e.g. a projector).
        rows (`torch.Tensor` of shape `(num_entries, dim)`).
        keep (`torch.Tensor` of shape `(num_entries,)`, bool).

    Returns:
        `torch.Tensor` of shape `(num_entries, out_dim)`, zero rows where `keep` is False.
    """
    keep = keep.to(rows.device)
    if bool(keep.all()):
        return function(rows)
    return scatter_kept(function(rows[keep]), keep)
