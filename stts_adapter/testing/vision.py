"""Tiny ViTs without a language model (timm, transformers vision towers) for the vision conformance suite."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .common import moving_square_video

FRAME_SIZE = 56  # 4x4 patches of 14 px


@dataclass(frozen=True)
class VisionCase:
    """What tests/test_conformance_vision.py needs to run one ViT-only registry entry.

    Args:
        name (`str`): the registry entry.
        make_model (`Callable[[], nn.Module]`): a tiny model, the same weights at every call.
        inputs (`Callable[[torch.Tensor, list[int]], dict]`): the forward arguments for `(frames, 3, H, W)` pixels
            and the frames of each video.
        features (`Callable[[Any], torch.Tensor]`): the per-frame output to compare (logits, hidden states).
        units_per_frame (`int`): patches per frame (1x1 units), independent of the entry.
        prefix_tokens (`int`): CLS / register tokens per frame.
        prune_layer (`int`): prune layer of the tests.
    """

    name: str
    make_model: Any
    inputs: Any
    features: Any
    units_per_frame: int
    prefix_tokens: int = 0
    prune_layer: int = 1

    def video(self, frames: int, seed: int) -> torch.Tensor:
        return moving_square_video(frames, FRAME_SIZE, FRAME_SIZE, square=14, step=(0, 7), seed=seed)

    def __repr__(self) -> str:
        return self.name


def _tower(model_class_name: str, config_class_name: str, **extra: Any):
    def make():
        import transformers

        torch.manual_seed(0)
        config = getattr(transformers, config_class_name)(
            hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4, patch_size=14, **extra
        )
        return getattr(transformers, model_class_name)(config).eval()

    return make


def _timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(
        img_size=FRAME_SIZE, patch_size=14, embed_dim=64, depth=5, num_heads=4, num_classes=7, reg_tokens=2
    ).eval()


def patchify_for_siglip2(frames: torch.Tensor, patch: int = 14) -> torch.Tensor:
    """`(frames, 3, H, W)` -> `(frames, patches, 3 * patch * patch)`, patches row-major, as Siglip2's processor."""
    count, channels = frames.shape[:2]
    patches = frames.unfold(2, patch, patch).unfold(3, patch, patch)  # (F, C, rows, cols, p, p)
    return patches.permute(0, 2, 3, 4, 5, 1).reshape(count, -1, patch * patch * channels)


def _siglip2_inputs(frames: torch.Tensor, frames_per_video: list[int]) -> dict:
    rows, columns = frames.shape[-2] // 14, frames.shape[-1] // 14
    return {
        "pixel_values": patchify_for_siglip2(frames),
        "spatial_shapes": torch.tensor([[rows, columns]] * frames.shape[0]),
        "pixel_attention_mask": torch.ones(frames.shape[0], rows * columns, dtype=torch.long),
        "frames_per_video": frames_per_video,
    }


TIMM_VIT = VisionCase(
    name="timm_vit",
    make_model=_timm_vit,
    inputs=lambda frames, per_video: {"x": frames, "frames_per_video": per_video},
    features=lambda out: out,
    units_per_frame=16,
    prefix_tokens=3,
)
SIGLIP_VISION = VisionCase(
    name="siglip_vision",
    make_model=_tower("SiglipVisionModel", "SiglipVisionConfig", image_size=FRAME_SIZE),
    inputs=lambda frames, per_video: {"pixel_values": frames, "frames_per_video": per_video},
    features=lambda out: out.last_hidden_state,
    units_per_frame=16,
)
CLIP_VISION = VisionCase(
    name="clip_vision",
    make_model=_tower("CLIPVisionModel", "CLIPVisionConfig", image_size=FRAME_SIZE),
    inputs=lambda frames, per_video: {"pixel_values": frames, "frames_per_video": per_video},
    features=lambda out: out.last_hidden_state,
    units_per_frame=16,
    prefix_tokens=1,
)
SIGLIP2_VISION = VisionCase(
    name="siglip2_vision",
    make_model=_tower("Siglip2VisionModel", "Siglip2VisionConfig", num_patches=16, num_channels=3),
    inputs=_siglip2_inputs,
    features=lambda out: out.last_hidden_state,
    units_per_frame=16,
)

VISION_CASES = (TIMM_VIT, SIGLIP_VISION, CLIP_VISION, SIGLIP2_VISION)
"""Every ViT-alone family's case (the VLM cases are each family module's `FamilyCase`)."""
