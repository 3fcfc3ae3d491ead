"""LLaVA-NeXT-Video (module layout of transformers 5.23).

`model.vision_tower` (a CLIP vision model) runs a video's frames as a batch, `(videos * frames, 1 + patches, D)`. The
"default" feature-select strategy drops the CLS token; `vision_resampler` pools every frame's patch grid with a
`spatial_pool_stride` kernel and stride (2: average pooling of 2x2 cells), then `multi_modal_projector` maps every
pooled token to the LLM. There is no newline token for videos. A pruning unit is one pooling cell (2x2 patches), so the
pooled grid loses whole tokens and a kept token's features depend on kept patches only; the pruned patches are scattered
back (holding their block k+1 features) only so that the pooling sees the full grid, and their pooled tokens are dropped
before the projector, which runs on the kept cells only. The CLS token of every frame is never pruned (it stays in the
ViT for the kept patches to attend to). On a grid the stride does not divide, the pooling ignores the last rows /
columns: those patches belong to no unit and are never pruned either. Images (any-resolution, with newlines) are never
pruned.

`encode_videos` mirrors `LlavaNextVideoModel.get_video_features` of transformers 5.23; the shared CLIP-tower logic
(CLS prefix, captured `vision_feature_layer`) lives in `model_registry/video_llava.py`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from stts_adapter.registry import register_architecture
from stts_adapter.runtime import VisionPruningPass

from .video_llava import ClipVideoTowerEntry


def pooling_cell_units(side: int, stride: int) -> torch.Tensor:
    """`(side * side,)` cell of every patch of a row-major `side x side` grid under a `stride x stride` pooling
    with kernel = stride (no padding, floor mode), -1 for the patches the pooling ignores."""
    pooled = side // stride
    rows, columns = torch.arange(side) // stride, torch.arange(side) // stride
    cells = rows[:, None] * pooled + columns[None, :]
    inside = (rows[:, None] < pooled) & (columns[None, :] < pooled)
    return torch.where(inside, cells, -1).flatten()


@register_architecture
class LlavaNextVideoEntry(ClipVideoTowerEntry):
    name = "llava_next_video"
    model_types = ("llava_next_video",)
    video_tower = "model.vision_tower"
    vision_blocks = "model.vision_tower.encoder.layers"
    image_inputs = ("image_sizes", "vision_feature_layer", "vision_feature_select_strategy")

    def patches_per_unit(self, model: nn.Module) -> int:
        return model.config.spatial_pool_stride**2

    def unit_of_patch(self, model: nn.Module) -> torch.Tensor:
        return pooling_cell_units(self.grid_side(model), model.config.spatial_pool_stride)

    def encode_videos(
        self, model: nn.Module, inputs: dict[str, Any], vision_pass: VisionPruningPass
    ) -> list[torch.Tensor]:
        # LlavaNextVideoModel.get_video_features (transformers 5.23), reading the scattered-back layers.
        core = model.model
        selected = self.selected_video_features(model, inputs, vision_pass)
        strategy = inputs.get("vision_feature_select_strategy") or model.config.vision_feature_select_strategy
        if strategy == "default":
            selected = selected[:, self.num_prefix_tokens :]
        pooled = core.vision_resampler(selected)  # (videos * frames, units_per_frame, D): every cell, then
        return self.project_kept(core.multi_modal_projector, pooled, vision_pass)  # the projector on kept cells only
