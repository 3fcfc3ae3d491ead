"""Tiny Qwen2-VL / Qwen2.5-VL models and batches laid out exactly as their processor lays them out."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from ..sequence import pad_token_id
from .common import FamilyCase, Sample, special_tokens, tiny_text_config, tokenize
from .processors import merged_patch_sizes, tiny_tokenizer


def tiny_qwen2_5_vl_config(**vision_overrides: Any):
    """A Qwen2.5-VL config with a 5-block, 64-wide ViT (windowed blocks 0, 2, 3) and a 2-layer, 64-wide LLM.

    Args:
        **vision_overrides: fields of the vision config to change (e.g. `depth`, `hidden_size`).
    """
    from transformers import Qwen2_5_VLConfig

    vision = dict(
        depth=5,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        out_hidden_size=64,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,  # 2x2 units per window
        fullatt_block_indexes=[1, 4],
        tokens_per_second=2,
    )
    vision.update(vision_overrides)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=tiny_text_config(), **special_tokens())


def small_qwen2_5_vl_config(
    vision_depth: int = 12, vision_width: int = 256, text_layers: int = 8, text_width: int = 512
):
    """A benchmark-size Qwen2.5-VL config (random init): big enough that ViT and LLM costs look like a real model's
    proportions on CPU, small enough to train for a few dozen steps in a minute.

    Args:
        vision_depth, vision_width (`int`): ViT blocks and width (4 heads, MLP 2x width).
        text_layers, text_width (`int`): LLM layers and width (MLP 2x width).
    """
    from transformers import Qwen2_5_VLConfig

    vision = dict(
        depth=vision_depth,
        hidden_size=vision_width,
        intermediate_size=2 * vision_width,
        num_heads=4,
        out_hidden_size=text_width,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=list(range(vision_depth // 4 - 1, vision_depth, vision_depth // 4)),
        tokens_per_second=2,
    )
    text = tiny_text_config(text_width, text_layers, 2 * text_width)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, **special_tokens())


def qwen2_5_vl_3b_config():
    """Qwen2.5-VL-3B-Instruct's shapes (ViT 32 x 1280, windows of 112 px with full attention in blocks 7, 15, 23,
    31; LLM 36 x 2048 with 16 heads and 2 KV heads), for random-weight models of real size: the GPU speed benchmark
    (`python -m benchmarks.speed --family qwen2_5_vl_3b`) and the serving estimate. No weights are downloaded. The
    special tokens are the tiny tokenizer's (`special_tokens`), so the test batch builders lay its inputs out.
    """
    from transformers import Qwen2_5_VLConfig

    vision = dict(
        depth=32,
        hidden_size=1280,
        intermediate_size=3420,
        num_heads=16,
        out_hidden_size=2048,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[7, 15, 23, 31],
        tokens_per_second=2,
    )
    text = {
        **tiny_text_config(),  # the tiny tokenizer's special ids
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 128000,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
    }
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=True, **special_tokens())


def tiny_qwen2_vl_config(**vision_overrides: Any):
    """A Qwen2-VL config with a 4-block, 64-wide ViT and a 2-layer, 64-wide LLM."""
    from transformers import Qwen2VLConfig

    vision = dict(depth=4, embed_dim=64, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=14, spatial_merge_size=2)
    vision.update(vision_overrides)
    return Qwen2VLConfig(vision_config=vision, text_config=tiny_text_config(), **special_tokens())


def qwen_patchify(video: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten a video into Qwen-VL ViT patches, in the processor's order (temporal slot, merge block, patch).

    Args:
        video (`torch.Tensor` of shape `(frames, 3, height, width)`): frames (odd counts are padded by repeating
            the last frame, as the processor does); height and width multiples of patch_size x merge_size.
        config: the model config (its `vision_config` gives the patch sizes).

    Returns:
        pixel_values (`torch.Tensor` of shape `(slots * h * w, 3 * temporal_patch * patch * patch)`),
        grid_thw (`torch.Tensor` of shape `(3,)`).
    """
    vision = config.vision_config
    patch, merge, temporal = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    if video.shape[0] % temporal:
        video = torch.cat([video, video[-1:].expand(temporal - video.shape[0] % temporal, -1, -1, -1)])
    frames, channels, height, width = video.shape
    t, h, w = frames // temporal, height // patch, width // patch
    patches = video.reshape(t, temporal, channels, h // merge, merge, patch, w // merge, merge, patch)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(t * h * w, channels * temporal * patch * patch), torch.tensor([t, h, w])


def qwen_video_placeholders(config, grid: torch.Tensor) -> list[int]:
    """Qwen2-VL / Qwen2.5-VL: a video is `<vision_start> <video_pad> x units <vision_end>`."""
    units = int(grid.prod() // config.vision_config.spatial_merge_size**2)
    return [config.vision_start_token_id] + [config.video_token_id] * units + [config.vision_end_token_id]


def build_qwen_batch(
    config,
    samples: list[Sample],
    padding_side: str = "left",
    video_placeholders: Callable[[Any, torch.Tensor], list[int]] = qwen_video_placeholders,
    second_per_grid_ts: bool = True,
) -> dict[str, torch.Tensor]:
    """Tokenise samples the way the Qwen-VL processors do.

    An image becomes `<vision_start> <image_pad> x units <vision_end>`, a video what `video_placeholders` writes for
    its grid; `mm_token_type_ids` marks the pads, and with answers the labels are -100 everywhere but on the answer.

    Args:
        config: the model config.
        samples (`list[Sample]`): the batch.
        padding_side (`str`): "left" or "right".
        video_placeholders (`Callable[[config, grid], list[int]]`): a video's ids (Qwen3-VL: per temporal slot).
        second_per_grid_ts (`bool`): add `second_per_grid_ts` (Qwen2.5-VL's processor does, Qwen3-VL's does not).

    Returns:
        `dict`: the model's keyword arguments.
    """
    merge = config.vision_config.spatial_merge_size
    image_token, video_token = config.image_token_id, config.video_token_id
    start, end = config.vision_start_token_id, config.vision_end_token_id
    videos, grids, images, image_grids = [], [], [], []

    def placeholders(sample: Sample) -> list[int]:
        ids = []
        if sample.image is not None:
            pixels, grid = qwen_patchify(sample.image[None], config)
            images.append(pixels)
            image_grids.append(grid)
            ids += [start] + [image_token] * int(grid.prod() // merge**2) + [end]
        if sample.video is not None:
            pixels, grid = qwen_patchify(sample.video, config)
            videos.append(pixels)
            grids.append(grid)
            ids += video_placeholders(config, grid)
        return ids

    batch = tokenize(samples, placeholders, padding_side, pad_token_id(config))
    input_ids = batch["input_ids"]
    batch["mm_token_type_ids"] = (input_ids == image_token).int() + 2 * (input_ids == video_token).int()
    if videos:
        batch["pixel_values_videos"] = torch.cat(videos)
        batch["video_grid_thw"] = torch.stack(grids)
        if second_per_grid_ts:
            batch["second_per_grid_ts"] = torch.ones(len(videos))
    if images:
        batch["pixel_values"] = torch.cat(images)
        batch["image_grid_thw"] = torch.stack(image_grids)
    return batch


def qwen_video_units(config, frames: int, height: int, width: int) -> tuple[int, int]:
    """(temporal slots, units per slot) the Qwen processor makes of a video: 2 frames per slot, 2x2 patches per unit."""
    vision = config.vision_config
    side = vision.patch_size * vision.spatial_merge_size
    return -(-frames // vision.temporal_patch_size), (height // side) * (width // side)


def tiny_qwen_vl_processor(
    config: Any, processor_class: str = "Qwen2_5_VLProcessor", video_processor_class: str = "Qwen2VLVideoProcessor"
) -> Any:
    """A Qwen-VL processor (`Qwen2_5_VLProcessor`, `Qwen2VLProcessor` or `Qwen3VLProcessor`, with
    `Qwen2VLImageProcessor` and the family's video processor) for the tiny Qwen configs: the config's patch, merge
    and temporal patch sizes, frames resized between 56x56 and 448x448 pixels, every frame given kept (no frame
    sampling).

    Needs torchvision (the video processor).
    """
    import transformers

    sizes = merged_patch_sizes(config.vision_config)
    tokenizer = tiny_tokenizer(
        {
            "<|image_pad|>": config.image_token_id,
            "<|video_pad|>": config.video_token_id,
            "<|vision_start|>": config.vision_start_token_id,
            "<|vision_end|>": config.vision_end_token_id,
        }
    )
    return getattr(transformers, processor_class)(
        image_processor=transformers.Qwen2VLImageProcessor(**sizes),
        video_processor=getattr(transformers, video_processor_class)(
            **sizes, do_sample_frames=False, cap_pixels_per_frame=True
        ),
        tokenizer=tokenizer,
    )


def _qwen_case(name: str, model_class_name: str, make_config, processor_class: str) -> FamilyCase:
    import transformers

    return FamilyCase(
        name=name,
        model_class=getattr(transformers, model_class_name),
        make_config=make_config,
        build_batch=build_qwen_batch,
        videos=((8, 112, 168), (4, 84, 112)),
        units=qwen_video_units,
        vit_tokens_per_unit=4,
        one_frame=2,
        packs_rows=False,
        make_processor=functools.partial(tiny_qwen_vl_processor, processor_class=processor_class),
        video_prompt="<|vision_start|><|video_pad|><|vision_end|>",
        processor_videos=((8, 112, 168), (4, 84, 112)),
    )


QWEN2_5_VL = _qwen_case(
    "qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", tiny_qwen2_5_vl_config, "Qwen2_5_VLProcessor"
)
QWEN2_VL = _qwen_case("qwen2_vl", "Qwen2VLForConditionalGeneration", tiny_qwen2_vl_config, "Qwen2VLProcessor")
