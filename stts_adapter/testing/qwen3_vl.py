"""Tiny Qwen3-VL models and batches laid out exactly as its processor lays them out."""

from __future__ import annotations

import functools
from typing import Any

import torch

from .common import FamilyCase, Sample, special_tokens, tiny_text_config
from .qwen import build_qwen_batch, qwen_video_units, tiny_qwen_vl_processor

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


def qwen3_vl_video_placeholders(config, grid: torch.Tensor) -> list[int]:
    """Qwen3-VL: per temporal slot, `<t seconds> <vision_start> <video_pad> x units_per_slot <vision_end>`."""
    per_slot = int(grid[1:].prod() // config.vision_config.spatial_merge_size**2)
    start, end = config.vision_start_token_id, config.vision_end_token_id
    return [
        token
        for slot in range(int(grid[0]))
        for token in (*timestamp_tokens(slot), start, *[config.video_token_id] * per_slot, end)
    ]


def build_qwen3_vl_batch(config, samples: list[Sample], padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Tokenise samples the way the Qwen3-VL processor does: `build_qwen_batch` with a video written per temporal
    slot (`qwen3_vl_video_placeholders`) and no `second_per_grid_ts`."""
    return build_qwen_batch(
        config, samples, padding_side, video_placeholders=qwen3_vl_video_placeholders, second_per_grid_ts=False
    )


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
        make_processor=functools.partial(
            tiny_qwen_vl_processor, processor_class="Qwen3VLProcessor", video_processor_class="Qwen3VLVideoProcessor"
        ),
        video_prompt="<|vision_start|><|video_pad|><|vision_end|>",
        processor_videos=((8, 128, 192), (4, 96, 128)),
    )


QWEN3_VL = _case()
