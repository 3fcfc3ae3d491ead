"""Tiny LLaVA-OneVision models and video batches laid out as its processor lays them out."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..sequence import pad_token_id
from .common import IMAGE_TOKEN, VIDEO_TOKEN, FamilyCase, Sample, tiny_text_config, tokenize
from .processors import tiny_tokenizer


def llava_onevision_config(vision: dict[str, Any], text: dict[str, Any], **extra: Any):
    """A LLaVA-OneVision config from its SigLIP tower's and its Qwen2 LLM's fields (no head on the tower), with the
    tiny tokenizer's placeholder ids and every patch of the last block as the video features.

    Args:
        vision (`dict`): `SiglipVisionConfig` fields.
        text (`dict`): `Qwen2Config` fields (`tiny_text_config(mrope=False, model_type="qwen2")` and overrides).
        **extra: other `LlavaOnevisionConfig` fields (e.g. `image_grid_pinpoints`).
    """
    from transformers import LlavaOnevisionConfig

    return LlavaOnevisionConfig(
        vision_config={"model_type": "siglip_vision_model", "vision_use_head": False, **vision},
        text_config=text,
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        **extra,
    )


def tiny_llava_onevision_config(image_size: int = 56, depth: int = 5, **vision_overrides):
    """LLaVA-OneVision with a 5-block, 64-wide SigLIP tower (`image_size` px, patch 14) and a 2-layer Qwen2 LLM.

    Args:
        image_size (`int`): frame side in pixels; 56 gives 4x4 patches (2x2 units), 70 gives 5x5 patches, whose
            3x3 units have 4, 2 or 1 patches (the bilinear pooling of an odd grid).
        depth (`int`): ViT blocks.
    """
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=depth, num_attention_heads=4)
    vision.update(image_size=image_size, patch_size=14)
    vision.update(vision_overrides)
    text = tiny_text_config(mrope=False, model_type="qwen2")
    return llava_onevision_config(vision, text, image_grid_pinpoints=[[image_size, image_size]])


def llava_onevision_7b_config():
    """LLaVA-OneVision-Qwen2-7B's shapes (SigLIP 26 x 1152 with MLP 4304, 384 px frames: 27 x 27 patches pooled to
    14 x 14 tokens; LLM Qwen2 28 x 3584 with 28 heads and 4 KV heads), for counting FLOPs at real size
    (`python -m benchmarks.serving_estimate`). No weights are downloaded; the special tokens are the tiny tokenizer's.
    """
    vision = dict(
        hidden_size=1152,
        intermediate_size=4304,
        num_hidden_layers=26,
        num_attention_heads=16,
        image_size=384,
        patch_size=14,
    )
    text = {
        **tiny_text_config(mrope=False, model_type="qwen2"),  # the tiny tokenizer's special ids
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152128,
    }
    return llava_onevision_config(vision, text)


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
