"""Tiny LLaVA-NeXT-Video models and batches laid out as `LlavaNextVideoProcessor` (transformers 5.23) lays them out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

import stts_adapter.model_registry.llava_next_video  # noqa: F401

from .common import IMAGE_TOKEN, VIDEO_TOKEN, FamilyCase, Sample, tiny_text_config, tokenize_stacked_videos
from .processors import tiny_tokenizer
from .video_llava import tiny_clip_vision_config

if TYPE_CHECKING:
    from transformers import LlavaNextVideoConfig, PretrainedConfig


def tiny_llava_next_video_config(
    image_size: int = 56, depth: int = 5, vision_feature_layer: int | list[int] = -2, **vision_overrides
) -> LlavaNextVideoConfig:
    """LLaVA-NeXT-Video with a 5-block, 64-wide CLIP tower and a 2-layer Llama LLM; videos pool 2x2 (average).

    The one any-resolution pinpoint is the frame size, so an `image_size` square image makes a base view and one
    grid view.

    Args:
        image_size (`int`): frame side in pixels (patch 14; 56 gives a 4x4 patch grid, 2x2 pooled tokens).
        depth (`int`): ViT blocks.
        vision_feature_layer (`int` or `list[int]`): the `hidden_states` the connector reads (LLaVA default -2).
        **vision_overrides: other fields of the vision config.
    """
    from transformers import LlavaNextVideoConfig

    return LlavaNextVideoConfig(
        vision_config=tiny_clip_vision_config(image_size, depth, **vision_overrides),
        text_config=tiny_text_config(mrope=False, model_type="llama"),
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        vision_feature_layer=vision_feature_layer,
        image_grid_pinpoints=[[image_size, image_size]],
    )


def llava_next_video_tokens_per_frame(config: PretrainedConfig) -> int:
    """Video placeholders per frame as `LlavaNextVideoProcessor.replace_video_token` counts them: patches // 4 (the
    processor hard-codes the 2x2 pooling; the CLS token is always dropped for videos)."""
    vision = config.vision_config
    return (vision.image_size // vision.patch_size) ** 2 // 4


def llava_next_video_image_tokens(config: PretrainedConfig) -> int:
    """Image placeholders of an `image_size` square image, as `LlavaNextVideoProcessor._get_number_of_features`
    counts them with the real processor's `num_additional_image_tokens=1` and the "default" strategy: the base view
    (side^2 + 1 CLS - 1 CLS) plus the unpadded grid view (side^2) with one newline per row (side)."""
    side = config.vision_config.image_size // config.vision_config.patch_size
    return 2 * side**2 + side


def build_llava_next_video_batch(
    config: PretrainedConfig, samples: list[Sample], padding_side: str = "left"
) -> dict[str, torch.Tensor]:
    """Tokenise samples the way `LlavaNextVideoProcessor` does.

    Each video becomes `frames x patches // 4` `<video>` placeholders; the videos are stacked into one
    `pixel_values_videos` tensor `(videos, frames, 3, size, size)` (so all videos of a batch have the same frame count
    and are `image_size` square, as the processor crops them). An image (placed before the video) must be
    `image_size` square: its any-resolution views are the resized base image and the one grid crop, i.e. the image
    twice, `pixel_values (images, 2, 3, size, size)` with `image_sizes (images, 2)`.

    Args:
        config: the model config.
        samples (`list[Sample]`): the batch.
        padding_side (`str`): "left" or "right".

    Returns:
        `dict`: the model's keyword arguments.
    """
    batch, images = tokenize_stacked_videos(
        config,
        samples,
        padding_side,
        llava_next_video_image_tokens(config),
        llava_next_video_tokens_per_frame(config),
    )
    if images:
        batch["pixel_values"] = torch.stack([torch.stack([image, image]) for image in images])
        batch["image_sizes"] = torch.tensor([list(image.shape[-2:]) for image in images])
    return batch


def llava_next_video_units(config: PretrainedConfig, frames: int, height: int, width: int) -> tuple[int, int]:
    """(frames, units per frame) of a video: the processor's pooled tokens per frame."""
    patch = config.vision_config.patch_size
    return frames, (height // patch) * (width // patch) // 4


def tiny_llava_next_video_processor(config: Any) -> Any:
    """`LlavaNextVideoProcessor` (with `LlavaNextImageProcessor` and `LlavaNextVideoVideoProcessor`) for
    `tiny_llava_next_video_config`: frames resized and center-cropped to the vision image size."""
    import transformers

    side = config.vision_config.image_size
    square = {"height": side, "width": side}
    return transformers.LlavaNextVideoProcessor(
        image_processor=transformers.LlavaNextImageProcessor(
            size={"shortest_edge": side}, crop_size=square, image_grid_pinpoints=[[side, side]]
        ),
        video_processor=transformers.LlavaNextVideoVideoProcessor(
            size={"shortest_edge": side}, crop_size=square, do_sample_frames=False
        ),
        tokenizer=tiny_tokenizer({"<image>": config.image_token_id, "<video>": config.video_token_id}),
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=0,
    )


def _case() -> FamilyCase:
    from transformers import LlavaNextVideoForConditionalGeneration

    return FamilyCase(
        name="llava_next_video",
        model_class=LlavaNextVideoForConditionalGeneration,
        make_config=tiny_llava_next_video_config,
        build_batch=build_llava_next_video_batch,
        videos=((4, 56, 56), (4, 56, 56)),  # one (videos, frames, ...) tensor: same frames and size
        make_processor=tiny_llava_next_video_processor,
        processor_videos=((4, 64, 80), (4, 90, 60)),  # resized and cropped to the image size; one frame count
        units=llava_next_video_units,
        vit_tokens_per_unit=4,
    )


LLAVA_NEXT_VIDEO = _case()
