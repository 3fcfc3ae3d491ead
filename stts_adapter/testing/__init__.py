"""Tiny models and synthetic videos for tests, examples and benchmarks (no downloads).

The batch builders lay tensors out exactly as the models' processors do, so the models run as in real use. One
module per family, like `stts_adapter.model_registry`; `FamilyCase` bundles what the conformance suite needs.
"""

from .common import (
    BOS,
    EOS,
    IMAGE_TOKEN,
    PAD,
    VIDEO_TOKEN,
    VISION_END,
    VISION_START,
    VOCAB_SIZE,
    FamilyCase,
    Sample,
    moving_square_video,
    pad_rows,
    special_tokens,
    tiny_text_config,
    tokenize,
)
from .qwen import (
    build_qwen_batch,
    qwen2_5_vl_3b_config,
    qwen_patchify,
    qwen_video_units,
    small_qwen2_5_vl_config,
    tiny_qwen2_5_vl_config,
    tiny_qwen2_vl_config,
)

__all__ = [
    "BOS",
    "EOS",
    "IMAGE_TOKEN",
    "PAD",
    "VIDEO_TOKEN",
    "VISION_END",
    "VISION_START",
    "VOCAB_SIZE",
    "FamilyCase",
    "Sample",
    "build_qwen_batch",
    "moving_square_video",
    "pad_rows",
    "qwen2_5_vl_3b_config",
    "qwen_patchify",
    "qwen_video_units",
    "small_qwen2_5_vl_config",
    "special_tokens",
    "tiny_qwen2_5_vl_config",
    "tiny_qwen2_vl_config",
    "tiny_text_config",
    "tokenize",
]
