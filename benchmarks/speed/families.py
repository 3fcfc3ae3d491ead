"""The benchmark's model families: a benchmark-size config, the processor-faithful batch builder, the unit grid and
the analytic FLOP model of each (`FAMILIES`)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
)

from benchmarks.speed.flops import FlopCount, llava_onevision_flops, qwen2_5_vl_flops
from stts_adapter.testing import (
    Sample,
    build_qwen_batch,
    moving_square_video,
    qwen2_5_vl_3b_config,
    small_qwen2_5_vl_config,
    tiny_text_config,
)
from stts_adapter.testing.llava_onevision import build_llava_onevision_batch, llava_onevision_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def benchmark_llava_onevision_config(
    size: int = 224, vision_depth: int = 12, vision_width: int = 256, text_layers: int = 8, text_width: int = 512
) -> LlavaOnevisionConfig:
    """A benchmark-size LLaVA-OneVision config (random init): a SigLIP tower (4 heads, MLP 4x width as in SigLIP,
    `size` px frames, patch 14, no head) and a Qwen2 LLM (4 heads, 2 KV heads, MLP 2x width).

    Args:
        size (`int`): frame side in pixels (the tower's image_size; the processor resizes frames to it).
        vision_depth, vision_width (`int`): ViT blocks and width.
        text_layers, text_width (`int`): LLM layers and width.
    """
    vision = dict(
        hidden_size=vision_width,
        intermediate_size=4 * vision_width,
        num_hidden_layers=vision_depth,
        num_attention_heads=4,
        image_size=size,
        patch_size=14,
    )
    text = tiny_text_config(text_width, text_layers, 2 * text_width, mrope=False, model_type="qwen2")
    return llava_onevision_config(vision, text, image_grid_pinpoints=[[size, size]])


@dataclass(frozen=True)
class Family:
    """One model family of the benchmark.

    Args:
        name (`str`): the `--family` value.
        description (`str`): the model, for the markdown.
        model_class (`type`): transformers class.
        make_config (`Callable[[int], PretrainedConfig]`): benchmark config for a frame side in pixels.
        build_batch (`Callable[[config, list[Sample]], dict]`): the processor-faithful batch builder.
        unit_grid (`Callable[[config, int], tuple[int, int]]`): units per frame side (rows, columns) at a frame side.
        flops (`Callable[..., FlopCount]`): the analytic FLOP model (see `qwen2_5_vl_flops`).
        patch_embedding, connector (`str`): module paths in the transformers model (`--profile`'s stages).
    """

    name: str
    description: str
    model_class: type
    make_config: Callable[[int], Any]
    build_batch: Callable[[Any, list[Sample]], dict[str, torch.Tensor]]
    unit_grid: Callable[[Any, int], tuple[int, int]]
    flops: Callable[..., FlopCount]
    patch_embedding: str
    connector: str

    def model(self, config: Any, device: str = "cpu", dtype: str = "float32", attention: str = "sdpa") -> nn.Module:
        """A random-init model of this family on `device`, in `dtype`, with transformers' `attention`
        implementation."""
        model = self.model_class(config).to(device=device, dtype=DTYPES[dtype])
        if attention != "sdpa":
            model.set_attn_implementation(attention)
        return model

    def batch(
        self, config: Any, frames: int, size: int, answer: bool, device: str = "cpu", dtype: str = "float32"
    ) -> dict[str, torch.Tensor]:
        """One video of `frames` frames at `size` px on `device` (pixels in `dtype`); with a 2-token answer (labels)
        for training, without for `generate`."""
        sample = Sample(video=moving_square_video(frames, size, size), answer=[5, 6] if answer else None)
        return {
            name: value.to(device, DTYPES[dtype] if value.is_floating_point() else value.dtype)
            for name, value in self.build_batch(config, [sample]).items()
        }


def qwen_unit_grid(config: Any, size: int) -> tuple[int, int]:
    """Units per frame side of Qwen2.5-VL at `size` px: patches merged 2x2."""
    side = size // (config.vision_config.patch_size * config.vision_config.spatial_merge_size)
    return side, side


def llava_unit_grid(config: Any, size: int) -> tuple[int, int]:
    """Units per frame side of LLaVA-OneVision at `size` px: the patch grid pooled 2x2 (rounded up)."""
    pooled = math.ceil(size // config.vision_config.patch_size / 2)
    return pooled, pooled


def qwen_family(name: str, description: str, make_config: Callable[[], Any]) -> Family:
    """A Qwen2.5-VL family of the benchmark: the model class, batch builder, unit grid and FLOP model it shares."""
    return Family(
        name=name,
        description=description,
        model_class=Qwen2_5_VLForConditionalGeneration,
        make_config=lambda size: make_config(),
        build_batch=build_qwen_batch,
        unit_grid=qwen_unit_grid,
        flops=qwen2_5_vl_flops,
        patch_embedding="model.visual.patch_embed",
        connector="model.visual.merger",
    )


FAMILIES = {
    "qwen2_5_vl": qwen_family(
        "qwen2_5_vl",
        "Qwen2.5-VL-style model (ViT 12x256 with windows of 4x4 units and full attention in blocks 2, 5, 8, 11, LLM "
        "8x512, random init); varlen ViT",
        small_qwen2_5_vl_config,
    ),
    "qwen2_5_vl_3b": qwen_family(
        "qwen2_5_vl_3b",
        "Qwen2.5-VL-3B's shapes (ViT 32x1280 with windows of 4x4 units and full attention in blocks 7, 15, 23, 31, "
        "LLM 36x2048, random init); varlen ViT",
        qwen2_5_vl_3b_config,
    ),
    "llava_onevision": Family(
        name="llava_onevision",
        description="LLaVA-OneVision-style model (SigLIP 12x256, MLP 1024, LLM 8x512, random init); frames run as "
        "the ViT's batch, pruned blocks run packed rows",
        model_class=LlavaOnevisionForConditionalGeneration,
        make_config=benchmark_llava_onevision_config,
        build_batch=build_llava_onevision_batch,
        unit_grid=llava_unit_grid,
        flops=llava_onevision_flops,
        patch_embedding="model.vision_tower.embeddings",
        connector="model.multi_modal_projector",
    ),
}
DEFAULT_FAMILIES = ("qwen2_5_vl", "llava_onevision")  # the 3B shapes are for GPUs (~15 GB in float32)
