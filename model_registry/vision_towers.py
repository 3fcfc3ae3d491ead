"""transformers vision towers on their own: `SiglipVisionModel`, `CLIPVisionModel`, `Siglip2VisionModel` (5.23).

For people who build their own VLM on these towers. No language model: frames run as the tower's batch, every patch
is a unit (`unit_side` for larger squares), CLIP's CLS token is never pruned, and the last block's output is
scattered back to the frames layout, so `last_hidden_state` is `(frames, tokens, dim)` with the pruned positions
holding their block k+1 features; `out.stts.keep_masks` says which patches were kept. CLIP's pooler (its CLS) is
exact; SigLIP's attention-pooling head sees the filled positions too.

Usage: `model(pixel_values=video)` with `(videos, frames, 3, H, W)` pixels, or `(frames, 3, H, W)` and
`frames_per_video`. Siglip2 takes its pre-patchified `(frames, patches, dim)` pixels with `spatial_shapes` and an
all-ones `pixel_attention_mask` (frames of one size: no padding patches) and `frames_per_video`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from stts_adapter.registry import register_architecture
from stts_adapter.vit import VisionOnlyViTEntry


class VisionTowerEntry(VisionOnlyViTEntry):
    """A transformers vision tower whose encoder layers take `(hidden_states, attention_mask)`."""

    vision_blocks = "encoder.layers"
    prefix: ClassVar[int] = 0

    def vision_config(self, model: nn.Module) -> Any:
        return model.config  # a tower alone: its own config

    def prefix_tokens(self, model: nn.Module) -> int:
        return self.prefix

    def patch_size(self, model: nn.Module) -> int:
        return model.config.patch_size


@register_architecture
class SiglipVisionEntry(VisionTowerEntry):
    name = "siglip_vision"
    model_types = ("siglip_vision_model",)


@register_architecture
class CLIPVisionEntry(VisionTowerEntry):
    name = "clip_vision"
    model_types = ("clip_vision_model",)
    prefix = 1  # the CLS token


@register_architecture
class Siglip2VisionEntry(VisionTowerEntry):
    name = "siglip2_vision"
    model_types = ("siglip2_vision_model",)
    image_ndim = 3  # (images, patches, channels * patch * patch)

    def patch_grid(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[int, int]:
        shapes = inputs["spatial_shapes"]
        if bool((shapes != shapes[:1]).any()):
            raise ValueError("STTS on Siglip2 needs frames of one size: every row of spatial_shapes must be equal.")
        rows, columns = (int(v) for v in shapes[0])
        if rows * columns != inputs[self.pixel_argument].shape[1]:
            raise ValueError(
                "STTS on Siglip2 needs frames without padding patches (max_num_patches = rows x columns), so that "
                "every token is a patch of the frame."
            )
        return rows, columns
