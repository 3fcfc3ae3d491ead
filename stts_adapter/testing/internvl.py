"""Tiny InternVL models and batches laid out as `InternVLProcessor` (transformers 5.23) lays them out."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

import stts_adapter.model_registry.internvl  # noqa: F401  (registers the entry)
from stts_adapter.model_registry.internvl import PIXEL_VIDEO_INDEX

from ..sequence import pad_token_id
from .common import IMAGE_TOKEN, VIDEO_TOKEN, VISION_END, VISION_START, FamilyCase, Sample, tiny_text_config, tokenize
from .processors import tiny_tokenizer

# Word ids standing for the processor's frame text: "Frame", ":" and "\n", and "1", "2", ... from FRAME_NUMBER on.
FRAME_WORD, COLON, NEWLINE, FRAME_NUMBER = 901, 902, 903, 910
IMG_START, IMG_END = VISION_START, VISION_END  # `<img>` and `</img>`


def tiny_internvl_config(image_size: int = 56, depth: int = 5, downsample_ratio: float = 0.5, **vision_overrides: Any):
    """InternVL with a 5-block, 64-wide InternViT (`image_size` px, patch 14, CLS token) and a 2-layer Qwen2 LLM.

    Args:
        image_size (`int`): frame / tile side in pixels: 28 gives 2x2 patches (one 2x2 pixel-shuffle cell per frame),
            56 gives 4x4 patches (2x2 cells).
        depth (`int`): ViT blocks.
        downsample_ratio (`float`): the pixel shuffle's ratio (0.5: 2x2 patches per LLM token).
        **vision_overrides: other fields of the vision config.
    """
    from transformers import InternVLConfig

    vision = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=depth,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=14,
    )
    vision.update(vision_overrides)
    side = image_size // 14
    return InternVLConfig(
        vision_config=vision,
        text_config=tiny_text_config(mrope=False, model_type="qwen2"),
        image_token_id=IMAGE_TOKEN,
        image_seq_length=round(side * downsample_ratio) ** 2,
        downsample_ratio=downsample_ratio,
    )


def internvl_tokens_per_tile(config) -> int:
    """Placeholders of one tile or frame (`image_seq_length`): the cells of the pixel shuffle."""
    side = config.vision_config.image_size[0] // config.vision_config.patch_size[0]
    return round(side * config.downsample_ratio) ** 2


def internvl_tiles(image: torch.Tensor, size: int) -> torch.Tensor:
    """A still image as the image processor's tiles (`crop_to_patches`): its `size` x `size` crops in row-major
    order, plus a thumbnail of the whole image when there is more than one crop.

    Args:
        image (`torch.Tensor` of shape `(3, height, width)`): height and width multiples of `size`.
        size (`int`): the tile side (the vision config's image size).

    Returns:
        `torch.Tensor` of shape `(tiles, 3, size, size)`.
    """
    channels, height, width = image.shape
    crops = image.reshape(channels, height // size, size, width // size, size).permute(1, 3, 0, 2, 4)
    crops = crops.reshape(-1, channels, size, size)
    if len(crops) == 1:
        return crops
    thumbnail = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)
    return torch.cat([crops, thumbnail])


def internvl_video_placeholders(config, frames: int) -> list[int]:
    """The ids `InternVLProcessor.replace_video_token` writes for a video of `frames` frames:
    `Frame1: <img> <IMG_CONTEXT> x L </img> \\n Frame2: ...` (frame texts joined by a newline)."""
    ids = []
    for frame in range(frames):
        if frame:
            ids.append(NEWLINE)
        ids += [FRAME_WORD, FRAME_NUMBER + frame, COLON, IMG_START]
        ids += [config.image_token_id] * internvl_tokens_per_tile(config) + [IMG_END]
    return ids


def build_internvl_batch(config, samples: list[Sample], padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Tokenise samples the way `InternVLProcessor` does, plus the one input STTS needs that it drops.

    An image becomes `<img> <IMG_CONTEXT> x (L * tiles) </img>` and is placed before the video; a video of T frames
    becomes `Frame1: <img> <IMG_CONTEXT> x L </img> \\n Frame2: ... </img>` (L = `image_seq_length`). Image tiles and
    frames go into ONE `pixel_values` `(rows, 3, size, size)` in text order, as the processor merges them.
    `pixel_values_video_index` gives every row its video (-1 for image tiles); it is only added when the batch holds
    a video.

    Args:
        config: the model config.
        samples (`list[Sample]`): the batch; frames and images must be tile-sized (images: multiples of it).
        padding_side (`str`): "left" or "right".

    Returns:
        `dict`: the model's keyword arguments.
    """
    size = config.vision_config.image_size[0]
    per_tile = internvl_tokens_per_tile(config)
    context = config.image_token_id
    rows, video_of_row = [], []

    def placeholders(sample: Sample) -> list[int]:
        ids = []
        if sample.image is not None:
            tiles = internvl_tiles(sample.image, size)
            rows.append(tiles)
            video_of_row.extend([-1] * len(tiles))
            ids += [IMG_START] + [context] * (per_tile * len(tiles)) + [IMG_END, NEWLINE]
        if sample.video is not None:
            video = max(video_of_row, default=-1) + 1
            rows.append(sample.video)
            video_of_row.extend([video] * len(sample.video))
            ids += internvl_video_placeholders(config, len(sample.video))
        return ids

    batch = tokenize(samples, placeholders, padding_side, pad_token_id(config))
    if rows:
        batch["pixel_values"] = torch.cat(rows)
    if any(video >= 0 for video in video_of_row):
        batch[PIXEL_VIDEO_INDEX] = torch.tensor(video_of_row)
    return batch


def internvl_video_units(config, frames: int, height: int, width: int) -> tuple[int, int]:
    """(frames, units per frame) of a video: every frame is one tile of `image_seq_length` pixel-shuffle cells."""
    return frames, internvl_tokens_per_tile(config)


def tiny_internvl_processor(config: Any, max_patches: int = 4) -> Any:
    """`InternVLProcessor` (with `GotOcr2ImageProcessor` and `InternVLVideoProcessor`) for `tiny_internvl_config`:
    tiles and frames of the vision image size, images cut into up to `max_patches` tiles plus a thumbnail.

    Needs torchvision (the video processor).
    """
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    named = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    tokenizer = tiny_tokenizer(
        {"<IMG_CONTEXT>": IMAGE_TOKEN, "<img>": VISION_START, "</img>": VISION_END, "<video>": VIDEO_TOKEN}, named
    )
    size = config.vision_config.image_size
    tile = {"height": size[0], "width": size[1]}
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=tile, crop_to_patches=True, max_patches=max_patches),
        video_processor=InternVLVideoProcessor(size=tile),
        tokenizer=tokenizer,
        image_seq_length=internvl_tokens_per_tile(config),
    )


def _case() -> FamilyCase:
    from transformers import InternVLForConditionalGeneration

    return FamilyCase(
        name="internvl",
        model_class=InternVLForConditionalGeneration,
        make_config=tiny_internvl_config,
        build_batch=build_internvl_batch,
        videos=((4, 56, 56), (3, 56, 56)),  # frames are rows of pixel_values: videos may differ in length
        units=internvl_video_units,
        vit_tokens_per_unit=4,
        make_processor=tiny_internvl_processor,
        video_prompt="<video>",
        processor_videos=((4, 64, 80), (4, 90, 60)),  # the processor stacks a call's videos: one frame count
    )


INTERNVL = _case()
