"""LLaVA-OneVision (module layout of transformers 5.23).

The SigLIP tower runs a video's frames as a batch. The connector projects the selected layer's patches, then pools
every frame's grid bilinearly to ceil(h/2) x ceil(w/2) tokens, and appends one newline token per video. A pruning
unit is the cell of patches nearest one pooled token (2x2 on even grids); the newline is never pruned. The layers the
connector reads are scattered back onto the full grid (pruned positions hold their block k+1 features). On an even
grid a pooled token is the mean of its own 2x2 cell, so the projector runs on the kept cells' patches only; on an odd
grid the bilinear weights reach across cells, so the projector and the pooling run on the whole grid and the pooled
tokens of pruned units are dropped afterwards.
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


def project_kept_cells(projector: nn.Module, patches: torch.Tensor, side: int, keep: torch.Tensor) -> torch.Tensor:
    """`apply_pooling(projector(patches))` of an even grid, computed for the kept cells only.

    Bilinear downsampling by exactly 2 (`align_corners=False`) weighs each axis 0.5 / 0.5 within a 2x2 cell: a
    pooled token is the mean of its cell's four projected patches, and the projector only needs the kept cells'.

    Args:
        projector (`nn.Module`): the multi-modal projector, applied to every patch on its own.
        patches (`torch.Tensor` of shape `(frames, side * side, dim)`): the frames' row-major patch grids.
        side (`int`): patches per side, even.
        keep (`torch.Tensor` of shape `(frames * (side // 2) ** 2,)`, bool): kept cells, frame after frame,
            row-major (the units of `nearest_cell_units`).

    Returns:
        `torch.Tensor` of shape `(frames, (side // 2) ** 2, projected_dim)`: the rows of pruned cells are zero.
    """
    frames, _, dim = patches.shape
    half = side // 2
    cells = patches.reshape(frames, half, 2, half, 2, dim).transpose(2, 3).reshape(-1, 4, dim)  # (cells, 4, dim)
    keep = keep.to(cells.device)
    pooled = projector(cells[keep]).mean(dim=1)  # (kept_cells, projected_dim)
    return scatter_kept(pooled, keep).view(frames, half * half, -1)


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
        side, _ = self._grid(model)
        if side % 2 or not vision_pass.prunes_units:
            # Odd grids: the bilinear weights reach across cells, the pooling needs the whole projected grid. Nothing
            # pruned: the upstream computation, so that the outputs are the bare model's bit for bit.
            features = core.apply_pooling(core.multi_modal_projector(selected))  # (frames, units_per_frame, D)
        else:
            features = project_kept_cells(core.multi_modal_projector, selected, side, vision_pass.keep)
        features = features.reshape(videos, frames * features.shape[1], -1)
        newline = core.image_newline[None, :].to(features)
        return [torch.cat([video, newline]) for video in features]

    def video_placeholder_keep(self, layout: VideoLayout, keep_units: torch.Tensor) -> list[torch.Tensor]:
        newline = keep_units.new_ones(1)
        return [torch.cat([keep, newline]) for keep in keep_units.split(list(layout.units_per_video))]

    def video_encoder_output(self, video_features: list[torch.Tensor]) -> BaseModelOutputWithPooling:
        return BaseModelOutputWithPooling(pooler_output=torch.cat(video_features)[None])  # flattened by the model
