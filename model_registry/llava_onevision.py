"""LLaVA-OneVision (module layout of transformers 5.23).

The SigLIP tower runs a video's frames as a batch. The connector projects the selected layer's patches, then pools
every frame's grid bilinearly to ceil(h/2) x ceil(w/2) tokens, and appends one newline token per video. A pruning
unit is the cell of patches nearest one pooled token (2x2 on even grids); the newline is never pruned. The layers the
connector reads are scattered back onto the full grid (pruned positions hold their block k+1 features). A pooled token
is a weighted sum of at most 2x2 projected patches (its own cell on an even grid; on an odd grid the bilinear weights
reach across cells), so the projector runs only on the patches the kept tokens read.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from stts_adapter.packing import FrameTokens
from stts_adapter.registry import register_architecture
from stts_adapter.runtime import VisionPruningPass
from stts_adapter.selection import VideoLayout, scatter_kept
from stts_adapter.vit import FrameBatchViTEntry, block_of_hidden_state


def nearest_cell_units(height: int, width: int, pooled_height: int, pooled_width: int) -> torch.Tensor:
    """`(height * width,)` pooled cell of every patch of a row-major grid (the cells partition the grid)."""
    rows = torch.arange(height) * pooled_height // height
    columns = torch.arange(width) * pooled_width // width
    return (rows[:, None] * pooled_width + columns[None, :]).flatten()


def pooling_weights(core: nn.Module, side: int, device: torch.device | str) -> torch.Tensor:
    """The model's pooling as a matrix: `(pooled_tokens, side * side)`, the weight of every patch in every pooled
    token, read off `apply_pooling` of the identity (so it is the model's own interpolation, whatever it is)."""
    identity = torch.eye(side * side, device=device)[None]  # one channel per patch
    return core.apply_pooling(identity)[0]


def project_kept_units(
    projector: nn.Module, patches: torch.Tensor, weights: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """`apply_pooling(projector(patches))` computed for the kept pooled tokens only: the projector runs on the
    patches they read, and each is the weighted sum of its patches' projections (the pooling is linear and comes
    after the projector).

    Args:
        projector (`nn.Module`): the multi-modal projector, applied to every patch on its own.
        patches (`torch.Tensor` of shape `(frames, side * side, dim)`): the frames' row-major patch grids.
        weights (`torch.Tensor` of shape `(units_per_frame, side * side)`): `pooling_weights`, >= 0.
        keep (`torch.Tensor` of shape `(frames * units_per_frame,)`, bool): kept pooled tokens, frame after frame.

    Returns:
        `torch.Tensor` of shape `(frames, units_per_frame, projected_dim)`: the rows of pruned tokens are zero.
    """
    frames, grid, _ = patches.shape
    keep = keep.to(patches.device).view(frames, -1)
    taps = int((weights != 0).sum(1).max())
    tap_weight, tap_patch = weights.topk(taps, dim=1)  # (units, taps): the patches each token reads
    frame, unit = keep.nonzero(as_tuple=True)
    frame, tap_weight, tap_patch = frame[:, None].expand(-1, taps), tap_weight[unit], tap_patch[unit]  # (kept, taps)
    needed = torch.zeros(frames, grid, dtype=torch.bool, device=patches.device)
    reads = tap_weight != 0  # a row with fewer patches than `taps` ends with 0-weight taps
    needed[frame[reads], tap_patch[reads]] = True
    projected = projector(patches[needed])  # (needed patches, projected_dim)
    row = (needed.flatten().cumsum(0) - 1).view(frames, grid)  # each needed patch's row of `projected`
    rows = row[frame, tap_patch].clamp(min=0)  # (kept, taps); a 0-weight tap may read any row
    pooled = (projected[rows].float() * tap_weight[..., None].float()).sum(dim=1).to(projected.dtype)
    return scatter_kept(pooled, keep.flatten()).view(frames, keep.shape[1], -1)


@register_architecture
class LlavaOnevisionEntry(FrameBatchViTEntry):
    name = "llava_onevision"
    model_types = ("llava_onevision",)
    vision_blocks = "model.vision_tower.encoder.layers"
    video_pixels = "pixel_values_videos"
    video_inputs = ("pixel_values_videos", "image_sizes_videos")
    image_inputs = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy", "batch_num_images")

    def patches_per_unit(self, model: nn.Module) -> int:
        return 4  # a 2x2 cell on even grids (odd grids have smaller cells at the edge)

    def _grid(self, model: nn.Module) -> tuple[int, int]:
        side = model.config.vision_config.image_size // model.config.vision_config.patch_size
        return side, math.ceil(side / 2)

    def video_layout(self, model: nn.Module, inputs: dict[str, Any]) -> VideoLayout:
        videos, frames = inputs["pixel_values_videos"].shape[:2]
        _, pooled = self._grid(model)
        return VideoLayout((frames,) * videos, (pooled * pooled,) * videos, patches_per_unit=4)

    def vision_tokens(self, model: nn.Module, inputs: dict[str, Any], layout: VideoLayout) -> FrameTokens:
        side, pooled = self._grid(model)
        unit_in_frame = nearest_cell_units(side, side, pooled, pooled)  # SigLIP has no CLS token
        first_unit_of_frame = torch.arange(layout.num_frames) * pooled * pooled
        token_unit = (first_unit_of_frame[:, None] + unit_in_frame[None, :]).flatten()
        return FrameTokens(
            token_unit=token_unit.to(self.vision_device(model)), num_units=layout.num_units, tokens_per_frame=side**2
        )

    def encode_videos(
        self, model: nn.Module, inputs: dict[str, Any], vision_pass: VisionPruningPass
    ) -> list[torch.Tensor]:
        # LlavaOnevisionModel.get_video_features (transformers 5.23), reading the scattered-back layers.
        core = model.model
        pixels = inputs["pixel_values_videos"]
        videos, frames = pixels.shape[:2]
        core.vision_tower(pixels.flatten(0, 1).to(core.vision_tower.dtype), return_dict=True)
        depth = model.config.vision_config.num_hidden_layers
        layers = [vision_pass.captured[block_of_hidden_state(i, depth)] for i in self.feature_layers(model)]
        selected = torch.cat(layers, dim=-1)
        strategy = inputs.get("vision_feature_select_strategy") or model.config.vision_feature_select_strategy
        if strategy == "default":
            selected = selected[:, 1:]
        if vision_pass.prunes_units:
            weights = pooling_weights(core, self._grid(model)[0], selected.device)
            features = project_kept_units(core.multi_modal_projector, selected, weights, vision_pass.keep)
        else:  # the upstream computation, so that the outputs are the bare model's bit for bit
            features = core.apply_pooling(core.multi_modal_projector(selected))  # (frames, units_per_frame, D)
        features = features.reshape(videos, frames * features.shape[1], -1)
        newline = core.image_newline[None, :].to(features)
        return [torch.cat([video, newline]) for video in features]

    def video_placeholder_units(self, layout: VideoLayout) -> list[torch.Tensor]:
        newline = torch.full((1,), -1, dtype=torch.long)  # shows no unit: it always stays
        return [torch.cat([units, newline]) for units in super().video_placeholder_units(layout)]

    def video_encoder_output(self, video_features: list[torch.Tensor]) -> BaseModelOutputWithPooling:
        return BaseModelOutputWithPooling(pooler_output=torch.cat(video_features)[None])  # flattened by the model
