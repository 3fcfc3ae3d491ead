"""Tiny models and synthetic videos for tests, examples and benchmarks (no downloads).

The batch builders lay tensors out exactly as the models' processors do, so the models run as in real use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .sequence import pad_token_id

# Special token ids of the tiny configs: inside the vocabulary, above every "word" id.
VOCAB_SIZE = 1000
PAD, BOS, EOS = 0, 1, 2
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START, VISION_END = 995, 996, 997, 998
WORD_IDS = (3, 990)


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
    return Qwen2_5_VLConfig(vision_config=vision, text_config=_tiny_text_config(), **_special_tokens())


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
    text = _tiny_text_config(text_width, text_layers, 2 * text_width)
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, **_special_tokens())


def tiny_qwen2_vl_config(**vision_overrides: Any):
    """A Qwen2-VL config with a 4-block, 64-wide ViT and a 2-layer, 64-wide LLM."""
    from transformers import Qwen2VLConfig

    vision = dict(depth=4, embed_dim=64, hidden_size=64, mlp_ratio=2, num_heads=4, patch_size=14, spatial_merge_size=2)
    vision.update(vision_overrides)
    return Qwen2VLConfig(vision_config=vision, text_config=_tiny_text_config(), **_special_tokens())


def _tiny_text_config(hidden_size: int = 64, num_hidden_layers: int = 2, intermediate_size: int = 128) -> dict:
    head_dim = hidden_size // 4
    half = head_dim // 2  # the M-RoPE sections (t, h, w) split head_dim / 2
    return dict(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=4096,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [half - 2 * (half // 3), half // 3, half // 3],
        },
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )


def _special_tokens() -> dict:
    return dict(
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VISION_START,
        vision_end_token_id=VISION_END,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )


# ------------------------------------------------------------------------------------------------ videos
def moving_square_video(
    frames: int = 8,
    height: int = 112,
    width: int = 112,
    square: int = 28,
    color: tuple[float, float, float] = (1.0, 0.1, 0.1),
    step: tuple[int, int] = (0, 14),
    start: tuple[int, int] = (14, 0),
    seed: int = 0,
) -> torch.Tensor:
    """A static textured background with one coloured square moving across it.

    Args:
        frames, height, width (`int`): video size.
        square (`int`): side of the square in pixels.
        color (`tuple`): RGB in [0, 1].
        step (`tuple`): (dy, dx) pixels the square moves per frame.
        start (`tuple`): (y, x) of its top-left corner in frame 0.
        seed (`int`): seed of the background texture.

    Returns:
        `torch.Tensor` of shape `(frames, 3, height, width)` in [0, 1].
    """
    generator = torch.Generator().manual_seed(seed)
    background = torch.rand(3, height // 14, width // 14, generator=generator) * 0.5 + 0.25
    background = background.repeat_interleave(14, 1).repeat_interleave(14, 2)
    video = background.expand(frames, 3, height, width).clone()
    for t in range(frames):
        y = (start[0] + t * step[0]) % max(1, height - square)
        x = (start[1] + t * step[1]) % max(1, width - square)
        video[t, :, y : y + square, x : x + square] = torch.tensor(color)[:, None, None]
    return video


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


# ------------------------------------------------------------------------------------------------ batches
@dataclass
class Sample:
    """One conversation: `prefix` text, an optional video, `suffix` text, and an optional `answer` to learn.

    Token lists are ids; the video is `(frames, 3, height, width)`.
    """

    video: torch.Tensor | None = None
    prefix: list[int] = field(default_factory=lambda: [BOS, 11, 12])
    suffix: list[int] = field(default_factory=lambda: [21, 22, 23])
    answer: list[int] | None = None
    image: torch.Tensor | None = None  # `(3, height, width)`, placed before the video


def build_qwen_batch(config, samples: list[Sample], padding_side: str = "left") -> dict[str, torch.Tensor]:
    """Tokenise samples the way the Qwen2-VL / Qwen2.5-VL processor does.

    Each video becomes `<vision_start> <video_pad> x units <vision_end>`, `mm_token_type_ids` marks the pads,
    `second_per_grid_ts` is given, and with answers the labels are -100 everywhere but on the answer.

    Args:
        config: the model config.
        samples (`list[Sample]`): the batch.
        padding_side (`str`): "left" or "right".

    Returns:
        `dict`: the model's keyword arguments.
    """
    merge = config.vision_config.spatial_merge_size
    image_token, video_token = config.image_token_id, config.video_token_id
    start, end, pad_id = config.vision_start_token_id, config.vision_end_token_id, pad_token_id(config)
    rows, label_rows, videos, grids, images, image_grids = [], [], [], [], [], []
    for sample in samples:
        ids = list(sample.prefix)
        if sample.image is not None:
            pixels, grid = qwen_patchify(sample.image[None], config)
            images.append(pixels)
            image_grids.append(grid)
            ids += [start] + [image_token] * int(grid.prod() // merge**2) + [end]
        if sample.video is not None:
            pixels, grid = qwen_patchify(sample.video, config)
            videos.append(pixels)
            grids.append(grid)
            ids += [start] + [video_token] * int(grid.prod() // merge**2) + [end]
        ids += list(sample.suffix)
        labels = [-100] * len(ids)
        if sample.answer is not None:
            ids += list(sample.answer)
            labels += list(sample.answer)
        rows.append(ids)
        label_rows.append(labels)

    length = max(len(r) for r in rows)

    def pad(row: list[int], value: int) -> list[int]:
        filler = [value] * (length - len(row))
        return filler + row if padding_side == "left" else row + filler

    input_ids = torch.tensor([pad(r, pad_id) for r in rows])
    batch = {
        "input_ids": input_ids,
        "attention_mask": torch.tensor([pad([1] * len(r), 0) for r in rows]),
        "mm_token_type_ids": (input_ids == image_token).int() + 2 * (input_ids == video_token).int(),
    }
    if videos:
        batch["pixel_values_videos"] = torch.cat(videos)
        batch["video_grid_thw"] = torch.stack(grids)
        batch["second_per_grid_ts"] = torch.ones(len(videos))
    if images:
        batch["pixel_values"] = torch.cat(images)
        batch["image_grid_thw"] = torch.stack(image_grids)
    if any(s.answer is not None for s in samples):
        batch["labels"] = torch.tensor([pad(r, -100) for r in label_rows])
    return batch
