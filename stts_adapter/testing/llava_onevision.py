"""Tiny LLaVA-OneVision models and video batches laid out as its processor lays them out."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..sequence import pad_token_id
from .common import IMAGE_TOKEN, VIDEO_TOKEN, FamilyCase, Sample, tiny_text_config, tokenize
from .processors import tiny_tokenizer


def tiny_llava_onevision_config(image_size: int = 56, depth: int = 5, **vision_overrides):
    """LLaVA-OneVision with a 5-block, 64-wide SigLIP tower (`image_size` px, patch 14) and a 2-layer Qwen2 LLM.

    Args:
        image_size (`int`): frame side in pixels; 56 gives 4x4 patches (2x2 units), 70 gives 5x5 patches, whose
            3x3 units have 4, 2 or 1 patches (the bilinear pooling of an odd grid).
        depth (`int`): ViT blocks.
    """
    from transformers import LlavaOnevisionConfig

    vision = dict(
        model_type="siglip_vision_model",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=depth,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=14,
        vision_use_head=False,
    )
    vision.update(vision_overrides)
    return LlavaOnevisionConfig(
        vision_config=vision,
        text_config=tiny_text_config(mrope=False, model_type="qwen2"),
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=[[image_size, image_size]],
    )


def llava_onevision_video_units(config) -> int:
    """Pooled tokens (units) per frame: ceil(side / 2) squared, as the processor counts them."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    return math.ceil(side / 2) ** 2


def build_llava_onevision_batch(config, samples: list[Sample], padding_side: str = "left") -> dict[str, torch.Tensor]:
    """One video per sample, `frames x units + 1` video placeholders (the +1 is the newline token).

    All videos of a batch must have the same frame count and be `image_size` square: the processor stacks them into
    one `(videos, frames, 3, size, size)` tensor.
    """
    units = llava_onevision_video_units(config)
    batch = tokenize(
        samples, lambda s: [config.video_token_id] * (s.video.shape[0] * units + 1), padding_side, pad_token_id(config)
    )
    batch["pixel_values_videos"] = torch.stack([s.video for s in samples])
    return batch


def _units(config, frames: int, height: int, width: int) -> tuple[int, int]:
    return frames, llava_onevision_video_units(config)


def tiny_llava_onevision_processor(config: Any) -> Any:
    """`LlavaOnevisionProcessor` (with `LlavaOnevisionImageProcessor` and `LlavaOnevisionVideoProcessor`) for
    `tiny_llava_onevision_config`: frames resized to the vision image size, every frame given kept."""
    import transformers

    side = config.vision_config.image_size
    square = {"height": side, "width": side}
    return transformers.LlavaOnevisionProcessor(
        image_processor=transformers.LlavaOnevisionImageProcessor(size=square, image_grid_pinpoints=[[side, side]]),
        video_processor=transformers.LlavaOnevisionVideoProcessor(size=square, do_sample_frames=False),
        tokenizer=tiny_tokenizer({"<image>": config.image_token_id, "<video>": config.video_token_id}),
        num_image_tokens=(side // config.vision_config.patch_size) ** 2,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
    )


def _case() -> FamilyCase:
    from transformers import LlavaOnevisionForConditionalGeneration

    return FamilyCase(
        name="llava_onevision",
        model_class=LlavaOnevisionForConditionalGeneration,
        make_config=tiny_llava_onevision_config,
        build_batch=build_llava_onevision_batch,
        videos=((4, 56, 56), (4, 56, 56)),  # one (videos, frames, ...) tensor: same frames and size
        units=_units,
        vit_tokens_per_unit=4,
        make_processor=tiny_llava_onevision_processor,
        processor_videos=((4, 64, 80), (4, 90, 60)),  # resized to the image size; the processor stacks: one length
    )


LLAVA_ONEVISION = _case()
