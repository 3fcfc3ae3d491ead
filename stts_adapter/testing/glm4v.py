"""Tiny GLM-4.1V models and batches laid out exactly as `Glm4vProcessor` (transformers 5.23) lays them out.

The processor replaces a prompt's `<|begin_of_video|><|video|><|end_of_video|>` (the chat template's video slot) by one
block per temporal slot (2 frames): `<|begin_of_image|> <|image|> x units <|end_of_image|>` followed by the slot's
timestamp as text (`str(int(seconds))`). Video frames therefore use the IMAGE placeholder token; only the surrounding
`<|begin_of_video|> ... <|end_of_video|>` tells them apart from a still image (`<|begin_of_image|> <|image|> x units
<|end_of_image|>`), and `mm_token_type_ids` is 2 for image tokens inside a video span, 1 for those outside, 0 elsewhere.
Pixels are patchified as `Glm4vVideoProcessor.patchify` / `Glm4vImageProcessor.patchify` do, which is the Qwen-VL
processors' order (`qwen_patchify`: slot, 2x2 merge block, patch; a still image repeated over the temporal patch, an
odd frame count padded with the last frame). Pixels are taken as already normalised.
"""

from __future__ import annotations

from typing import Any

import torch

import stts_adapter.model_registry.glm4v  # noqa: F401

from ..sequence import pad_token_id
from .common import (
    BOS,
    EOS,
    IMAGE_TOKEN,
    PAD,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    FamilyCase,
    Sample,
    tiny_text_config,
    tokenize,
)
from .processors import merged_patch_sizes, tiny_tokenizer
from .qwen import qwen_patchify

# GLM-4.1V's extra markers, inside the tiny vocabulary next to common.py's special ids (990 <= id < 1000).
VIDEO_START, VIDEO_END = 993, 994
IMAGE_START, IMAGE_END = VISION_START, VISION_END
TIMESTAMP_DIGITS = tuple(range(980, 990))
"""Token of every decimal digit of a timestamp (one token per digit in the tiny vocabulary)."""


def tiny_glm4v_config(**vision_overrides: Any):
    """A GLM-4.1V config with a 5-block, 64-wide ViT and a 2-layer, 64-wide LLM (special ids inside the vocab).

    The language model keeps GLM-4.1V's partial rotary embedding (half of every head rotates, M-RoPE sections
    (t, h, w) over that half).

    Args:
        **vision_overrides: fields of the vision config to change (e.g. `depth`).
    """
    from transformers import Glm4vConfig

    vision = dict(
        depth=5,
        hidden_size=64,
        num_heads=4,
        intermediate_size=128,  # the merger's width; the blocks' MLP width is out_hidden_size
        out_hidden_size=64,
        image_size=56,  # a 4x4 grid of learned position embeddings, interpolated to every frame size
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    vision.update(vision_overrides)
    text = tiny_text_config()
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "partial_rotary_factor": 0.5,
        "mrope_section": [2, 1, 1],  # sums to head_dim * partial_rotary_factor / 2
    }
    return Glm4vConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        image_start_token_id=IMAGE_START,
        image_end_token_id=IMAGE_END,
        video_start_token_id=VIDEO_START,
        video_end_token_id=VIDEO_END,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )


def timestamp_tokens(seconds: float) -> list[int]:
    """The tokens of `str(int(seconds))`, the text `Glm4vProcessor.replace_frame_token_id` puts after a frame."""
    return [TIMESTAMP_DIGITS[int(digit)] for digit in str(int(seconds))]


def glm4v_mm_token_type_ids(input_ids: torch.Tensor, config) -> torch.Tensor:
    """`Glm4vProcessor.create_mm_token_type_ids`: 2 for image tokens inside a video span, 1 for other image tokens."""
    starts = (input_ids == config.video_start_token_id).cumsum(-1)
    ends = (input_ids == config.video_end_token_id).cumsum(-1)
    in_video = starts > ends
    is_image = input_ids == config.image_token_id
    return (is_image & ~in_video).int() + 2 * (is_image & in_video).int()


def build_glm4v_batch(
    config, samples: list[Sample], padding_side: str = "left", fps: float = 2.0
) -> dict[str, torch.Tensor]:
    """Tokenise samples the way `Glm4vProcessor` does (chat-template markers included).

    A still image becomes `<|begin_of_image|> <|image|> x units <|end_of_image|>`; a video becomes
    `<|begin_of_video|>`, then per temporal slot `<|begin_of_image|> <|image|> x units <|end_of_image|>` and its
    timestamp, then `<|end_of_video|>`. `mm_token_type_ids` is made as the processor makes it.

    Args:
        config: the model config.
        samples (`list[Sample]`): the batch (an image is placed before the sample's video).
        padding_side (`str`): "left" or "right".
        fps (`float`): rate at which the frames were sampled (the video processor samples 2 per second); the
            timestamp of slot `i` is that of its first frame, `2 i / fps` seconds.

    Returns:
        `dict`: the model's keyword arguments.
    """
    merge = config.vision_config.spatial_merge_size
    temporal = config.vision_config.temporal_patch_size
    image_token = config.image_token_id
    videos, grids, images, image_grids = [], [], [], []

    def placeholders(sample: Sample) -> list[int]:
        ids = []
        if sample.image is not None:
            pixels, grid = qwen_patchify(sample.image[None], config)
            images.append(pixels)
            image_grids.append(grid)
            ids += [config.image_start_token_id] + [image_token] * int(grid.prod() // merge**2)
            ids += [config.image_end_token_id]
        if sample.video is not None:
            pixels, grid = qwen_patchify(sample.video, config)
            videos.append(pixels)
            grids.append(grid)
            slots, units_per_slot = int(grid[0]), int(grid[1] * grid[2] // merge**2)
            ids.append(config.video_start_token_id)
            for slot in range(slots):
                ids += [config.image_start_token_id] + [image_token] * units_per_slot + [config.image_end_token_id]
                ids += timestamp_tokens(slot * temporal / fps)
            ids.append(config.video_end_token_id)
        return ids

    batch = tokenize(samples, placeholders, padding_side, pad_token_id(config))
    batch["mm_token_type_ids"] = glm4v_mm_token_type_ids(batch["input_ids"], config)
    if images:
        batch["pixel_values"] = torch.cat(images)
        batch["image_grid_thw"] = torch.stack(image_grids)
    if videos:
        batch["pixel_values_videos"] = torch.cat(videos)
        batch["video_grid_thw"] = torch.stack(grids)
    return batch


def glm4v_video_units(config, frames: int, height: int, width: int) -> tuple[int, int]:
    """(temporal slots, units per slot) the GLM-4.1V processor makes of a video: 2 frames per slot, 2x2 patches per
    unit."""
    vision = config.vision_config
    side = vision.patch_size * vision.spatial_merge_size
    return -(-frames // vision.temporal_patch_size), (height // side) * (width // side)


def tiny_glm4v_processor(config: Any) -> Any:
    """`Glm4vProcessor` (with `Glm4vImageProcessor` and `Glm4vVideoProcessor`) for `tiny_glm4v_config`: the config's
    patch, merge and temporal patch sizes, frames resized between 56x56 and 448x448 pixels, every frame kept."""
    import transformers

    sizes = merged_patch_sizes(config.vision_config)
    tokenizer = tiny_tokenizer(
        {
            "<|image|>": config.image_token_id,
            "<|video|>": config.video_token_id,
            "<|begin_of_video|>": VIDEO_START,
            "<|end_of_video|>": VIDEO_END,
            "<|begin_of_image|>": IMAGE_START,
            "<|end_of_image|>": IMAGE_END,
        }
    )
    return transformers.Glm4vProcessor(
        image_processor=transformers.Glm4vImageProcessor(**sizes),
        video_processor=transformers.Glm4vVideoProcessor(**sizes, do_sample_frames=False),
        tokenizer=tokenizer,
    )


def _case() -> FamilyCase:
    from transformers import Glm4vForConditionalGeneration

    return FamilyCase(
        name="glm4v",
        model_class=Glm4vForConditionalGeneration,
        make_config=tiny_glm4v_config,
        build_batch=build_glm4v_batch,
        videos=((8, 112, 168), (4, 84, 112)),
        units=glm4v_video_units,
        vit_tokens_per_unit=4,
        one_frame=2,
        packs_rows=False,
        make_processor=tiny_glm4v_processor,
        video_prompt="<|begin_of_video|><|video|><|end_of_video|>",
        processor_videos=((8, 112, 168), (4, 84, 112)),
    )


GLM4V = _case()
