"""Tiny Qwen3-VL models and batches laid out exactly as its processor lays them out."""

from __future__ import annotations

from typing import Any

import torch

from ..sequence import pad_token_id
from .common import FamilyCase, Sample, special_tokens, tiny_text_config, tokenize
from .qwen import qwen_patchify, qwen_video_units

SECONDS_TOKEN = 300
"""Stands for the text of `<t seconds>` before every temporal slot (the time itself is token 301 + slot)."""


def tiny_qwen3_vl_config(text_layers: int = 2, **vision_overrides: Any):
    """A Qwen3-VL config with a 5-block, 64-wide ViT (patch 16, DeepStack taps after blocks 1 and 3) and a 64-wide
    LLM of `text_layers` layers (DeepStack adds tap i after decoder layer i, so keep `text_layers` >= the taps).

    Args:
        text_layers (`int`): decoder layers.
        **vision_overrides: fields of the vision config to change (e.g. `deepstack_visual_indexes`).
    """
    from transformers import Qwen3VLConfig

    vision = dict(
        depth=5,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        out_hidden_size=64,
        patch_size=16,
        spatial_merge_size=2,
        temporal_patch_size=2,
        num_position_embeddings=64,  # an 8x8 learned grid, interpolated to every video's grid
        deepstack_visual_indexes=[1, 3],
    )
    vision.update(vision_overrides)
    text = tiny_text_config(num_hidden_layers=text_layers, head_dim=16)  # Qwen3-VL's head_dim defaults to 128
    text["rope_parameters"]["mrope_interleaved"] = True
    return Qwen3VLConfig(vision_config=vision, text_config=text, **special_tokens())


def timestamp_tokens(slot: int) -> list[int]:
    """The ids standing for `<t seconds>` before temporal slot `slot` (text, so pruning never touches them)."""
    return [SECONDS_TOKEN, SECONDS_TOKEN + 1 + slot]


def build_qwen3_vl_batch(config, samples: list[Sample], padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Tokenise samples the way the Qwen3-VL processor does.

    An image becomes `<vision_start> <image_pad> x units <vision_end>`; a video becomes, for every temporal slot,
    `<t seconds> <vision_start> <video_pad> x units_per_slot <vision_end>`. `mm_token_type_ids` marks the pads; with
    answers the labels are -100 everywhere but on the answer.

    Args:
        config: the model config.
        samples (`list[Sample]`): the batch.
        padding_side (`str`): "left" or "right".

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
            per_slot = int(grid[1:].prod() // merge**2)
            for slot in range(int(grid[0])):
                ids += timestamp_tokens(slot) + [start] + [video_token] * per_slot + [end]
        return ids

    batch = tokenize(samples, placeholders, padding_side, pad_token_id(config))
    input_ids = batch["input_ids"]
    batch["mm_token_type_ids"] = (input_ids == image_token).int() + 2 * (input_ids == video_token).int()
    if videos:
        batch["pixel_values_videos"] = torch.cat(videos)
        batch["video_grid_thw"] = torch.stack(grids)
    if images:
        batch["pixel_values"] = torch.cat(images)
        batch["image_grid_thw"] = torch.stack(image_grids)
    return batch


def _case() -> FamilyCase:
    from transformers import Qwen3VLForConditionalGeneration

    return FamilyCase(
        name="qwen3_vl",
        model_class=Qwen3VLForConditionalGeneration,
        make_config=tiny_qwen3_vl_config,
        build_batch=build_qwen3_vl_batch,
        videos=((8, 128, 192), (4, 96, 128)),  # 32 px units: 4x6 and 3x4 units per slot
        units=qwen_video_units,
        vit_tokens_per_unit=4,
        one_frame=2,
        packs_rows=False,
    )


QWEN3_VL = _case()
