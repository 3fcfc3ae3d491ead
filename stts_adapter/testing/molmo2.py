"""Tiny Molmo2 models and video batches laid out exactly as the Molmo2 processor (transformers 5.23) lays them out.

`Molmo2VideoProcessor` cannot be imported without PIL, and `Molmo2Processor` needs the real tokenizer, so the batch
builder re-creates what they produce: frames resized to the model's square input size and normalised, cut into
row-major patches (`batch_pixels_to_patches`), pooling windows from `arange_for_pooling` offset per frame and per
video, and per frame the text `"<time> "` (a space before every frame but the first), `<frame_start>`, one
`<im_patch>` per window and `<frame_end>`. Timestamp text goes through a stand-in tokenizer of one id per character.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from stts_adapter.model_registry.molmo2 import pooling_indexes_each_video

from ..sequence import pad_token_id
from .common import (
    BOS,
    EOS,
    IMAGE_TOKEN,
    PAD,
    VISION_END,
    VISION_START,
    FamilyCase,
    Sample,
    tiny_text_config,
    tokenize,
)
from .processors import MOLMO2_IMAGE_LOW, MOLMO2_IMAGE_PROMPT, MOLMO2_VIDEO_PROMPT, tiny_tokenizer

# Special ids of the tiny configs, inside the vocabulary (common.py's ids where they mean the same thing).
IMAGE_START, IMAGE_END, LOW_RES_IMAGE_START, IMAGE_COL = 991, 992, 993, 994
IMAGE_PATCH, FRAME_START, FRAME_END = IMAGE_TOKEN, VISION_START, VISION_END
# The stand-in tokenizer of the timestamp text: one word id per character.
TIMESTAMP_IDS = {character: 300 + i for i, character in enumerate("0123456789. ")}
POOLING_SIZE = (3, 3)  # Molmo2VideoProcessor.pooling_size
DEFAULT_FPS = 2.0  # Molmo2VideoProcessor.max_fps: the timestamps' rate when a video comes without metadata
IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5)  # IMAGENET_STANDARD_MEAN / _STD of the processor


def tiny_molmo2_config(image_size: int = 84, depth: int = 6, feature_layers: tuple[int, ...] = (-2, 3)):
    """Molmo2 with a 64-wide ViT (patch 14), its two-layer pooling adapter and a 2-layer, 64-wide LLM.

    Args:
        image_size (`int`): square input size in pixels. 84 gives 6x6 patches, i.e. 2x2 full 3x3 pooling windows per
            frame (36 patches, 4 tokens); 126 gives 9x9 patches in 3x3 windows (81 patches, 9 tokens per frame: the
            real model's 27x27 -> 81 in small); 98 gives 7x7 patches, whose 3x3 windows at the grid edge overhang it
            (windows of 4, 6 and 9 patches).
        depth (`int`): ViT blocks.
        feature_layers (`tuple[int, ...]`): `adapter_config.vision_feature_layer`. The default reads blocks 4 and 3
            of 6, deep first like the released `[24, 18]`, both after block prune_layer + 1 of the tests (1), and
            leaves the last block unread; it mixes a negative and a non-negative index, the two conventions of
            `Molmo2Model.get_image_features`.
    """
    from transformers import Molmo2Config

    head = dict(num_attention_heads=4, num_key_value_heads=4, head_dim=16)
    vision = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=depth,
        image_size=[image_size, image_size],
        patch_size=14,
        **head,
    )
    adapter = dict(
        vision_feature_layer=list(feature_layers),
        hidden_size=64,
        intermediate_size=128,
        text_hidden_size=64,
        # At the default 0.02 this 64-wide random adapter (attention pooling, then a gated MLP: the scale enters
        # about to the 7th power) outputs ~1e-8 and the videos would not change the logits at all; 0.2 gives features
        # of the embeddings' order, so every comparison with the bare model sees the videos.
        initializer_range=0.2,
        **head,
    )
    # The released checkpoints keep their special tokens in the extra vocabulary; here they sit in the base one.
    text = tiny_text_config(mrope=False, head_dim=16, additional_vocab_size=16)
    return Molmo2Config(
        vision_config=vision,
        adapter_config=adapter,
        text_config=text,
        image_start_token_id=IMAGE_START,
        low_res_image_start_token_id=LOW_RES_IMAGE_START,
        image_end_token_id=IMAGE_END,
        image_patch_id=IMAGE_PATCH,
        frame_start_token_id=FRAME_START,
        frame_end_token_id=FRAME_END,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )


def image_token_ids(config) -> list[int]:
    """The ids `Molmo2Processor` marks 1 in `mm_token_type_ids` (its `image_token_ids`, `<im_low>` aside: the tiny
    vocabulary has none): patches, columns, image and frame starts and ends."""
    return [
        config.image_patch_id,
        IMAGE_COL,
        config.image_start_token_id,
        config.low_res_image_start_token_id,
        config.frame_start_token_id,
        config.image_end_token_id,
        config.frame_end_token_id,
    ]


# ------------------------------------------------------------------------------------------------ the processor
def arange_for_pooling(index_grid: torch.Tensor, pool_h: int, pool_w: int) -> tuple[torch.Tensor, int, int]:
    """`arange_for_pooling` of transformers 5.23 (models/molmo2/video_processing_molmo2.py), which cannot be imported
    without PIL: a `(h, w)` patch-index grid padded with -1 (split evenly, the extra one after) to whole windows,
    then grouped into `(rows * cols, pool_h * pool_w)` windows, row-major."""
    height_padding = pool_h * ((index_grid.shape[0] + pool_h - 1) // pool_h) - index_grid.shape[0]
    width_padding = pool_w * ((index_grid.shape[1] + pool_w - 1) // pool_w) - index_grid.shape[1]
    index_grid = F.pad(
        index_grid,
        (width_padding // 2, (width_padding + 1) // 2, height_padding // 2, (height_padding + 1) // 2),
        mode="constant",
        value=-1,
    )
    rows, cols = index_grid.shape[0] // pool_h, index_grid.shape[1] // pool_w
    windows = index_grid.reshape(rows, pool_h, cols, pool_w).permute(0, 2, 1, 3).reshape(rows * cols, pool_h * pool_w)
    return windows, rows, cols


def molmo2_video_patches(
    video: torch.Tensor, config, patch_offset: int = 0, pooling_size: tuple[int, int] = POOLING_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One video as `Molmo2VideoProcessor._preprocess` turns it into model inputs.

    Args:
        video (`torch.Tensor` of shape `(frames, 3, height, width)`): in [0, 1] (already rescaled).
        config: the model config (square input size and patch size).
        patch_offset (`int`): patches of the batch's earlier videos where the pooling indices are batch-global
            (transformers before 5.25; 0 from 5.25, see `pooling_indexes_each_video`).
        pooling_size (`tuple[int, int]`): the processor's pooling window.

    Returns:
        patches (`torch.Tensor` of shape `(frames, patches_per_frame, patch * patch * 3)`),
        pooling (`torch.Tensor` of shape `(frames * rows * cols, pool_h * pool_w)`): batch-global patch indices,
            -1 in the windows' overhang,
        grid (`torch.Tensor` of shape `(3,)`): frames, pooled rows, pooled columns.
    """
    size, patch = config.vision_config.image_size[0], config.vision_config.patch_size
    frames = video.shape[0]
    resized = F.interpolate(video.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    mean, std = torch.tensor(IMAGE_MEAN)[:, None, None], torch.tensor(IMAGE_STD)[:, None, None]
    pixels = ((resized - mean) / std).permute(0, 2, 3, 1)  # (frames, size, size, channels)
    side = size // patch
    patches = pixels.reshape(frames, side, patch, side, patch, 3).transpose(2, 3)  # batch_pixels_to_patches
    patches = patches.reshape(frames, side * side, patch * patch * 3)
    index_grid = torch.arange(side * side, dtype=torch.int32).reshape(side, side)
    windows, rows, cols = arange_for_pooling(index_grid, *pooling_size)
    frame_offsets = (patch_offset + torch.arange(frames) * side * side).view(-1, 1, 1)
    pooling = torch.where(windows >= 0, windows + frame_offsets, windows).reshape(-1, windows.shape[-1])
    return patches, pooling, torch.tensor([frames, rows, cols])


def molmo2_video_tokens(config, grid: torch.Tensor, fps: float = DEFAULT_FPS) -> list[int]:
    """The ids of `Molmo2Processor.get_video_string`: per frame `"<time> "`, `<frame_start>`, one `<im_patch>` per
    window, `<frame_end>`; frames after the first are preceded by a space."""
    frames, rows, cols = grid.tolist()
    ids = []
    for frame in range(frames):
        text = (" " if frame > 0 else "") + f"{frame / fps:.1f} "
        ids += [TIMESTAMP_IDS[c] for c in text]
        ids += [config.frame_start_token_id] + [config.image_patch_id] * (rows * cols) + [config.frame_end_token_id]
    return ids


def build_molmo2_batch(
    config, samples: list[Sample], padding_side: str = "left", pooling_size: tuple[int, int] = POOLING_SIZE
) -> dict[str, torch.Tensor]:
    """Tokenise samples the way `Molmo2Processor` does (at most one video per sample, videos only).

    Videos may differ in frame count and size (every frame is resized to the model's input size).
    `mm_token_type_ids` is 1 at the processor's image token ids (patches and frame markers), 0 elsewhere.

    Args:
        config: the model config.
        samples (`list[Sample]`): the batch.
        padding_side (`str`): "left" or "right".
        pooling_size (`tuple[int, int]`): the processor's pooling window.

    Returns:
        `dict`: the model's keyword arguments.
    """
    patches, poolings, grids = [], [], []

    def placeholders(sample: Sample) -> list[int]:
        if sample.image is not None:
            raise ValueError("The Molmo2 test batches hold videos only (Molmo2 takes images or videos per call).")
        if sample.video is None:
            return []
        offset = 0 if pooling_indexes_each_video() else sum(p.shape[0] * p.shape[1] for p in patches)
        video_patches, pooling, grid = molmo2_video_patches(sample.video, config, offset, pooling_size)
        patches.append(video_patches)
        poolings.append(pooling)
        grids.append(grid)
        return molmo2_video_tokens(config, grid)

    batch = tokenize(samples, placeholders, padding_side, pad_token_id(config))
    batch["mm_token_type_ids"] = torch.isin(batch["input_ids"], torch.tensor(image_token_ids(config))).long()
    if patches:
        batch["pixel_values_videos"] = torch.cat(patches)
        batch["video_token_pooling"] = torch.cat(poolings)
        batch["video_grids"] = torch.stack(grids)
    return batch


def molmo2_video_units(config, frames: int, height: int, width: int) -> tuple[int, int]:
    """(frames, windows per frame) the processor makes of a video: whatever its size, frames are resized to the
    model's input size, whose patch grid is cut into ceil(side / 3) squared 3x3 windows."""
    side = config.vision_config.image_size[0] // config.vision_config.patch_size
    return frames, math.ceil(side / POOLING_SIZE[0]) * math.ceil(side / POOLING_SIZE[1])


def tiny_molmo2_processor(config: Any) -> Any:
    """`Molmo2Processor` (with `Molmo2ImageProcessor` and `Molmo2VideoProcessor`) for `tiny_molmo2_config`: frames
    resized to the vision image size, 3x3 pooling windows, every frame kept. The prompt's video token is
    `<|video|>` (an id of its own: the model never sees it)."""
    import transformers

    side = {"height": config.vision_config.image_size[0], "width": config.vision_config.image_size[1]}
    patch = config.vision_config.patch_size
    tokenizer = tiny_tokenizer(
        {
            "<im_patch>": config.image_patch_id,
            "<im_col>": IMAGE_COL,
            "<im_start>": IMAGE_START,
            "<low_res_im_start>": LOW_RES_IMAGE_START,
            "<frame_start>": FRAME_START,
            "<im_end>": IMAGE_END,
            "<frame_end>": FRAME_END,
            "<im_low>": MOLMO2_IMAGE_LOW,
            "<|image|>": MOLMO2_IMAGE_PROMPT,
            "<|video|>": MOLMO2_VIDEO_PROMPT,
        }
    )
    return transformers.Molmo2Processor(
        image_processor=transformers.Molmo2ImageProcessor(size=side, patch_size=patch),
        # transformers 5.24's Molmo2VideoProcessor neither rescales nor normalises unless asked (it returns uint8
        # pixel values); the released checkpoint's preprocessing does both.
        video_processor=transformers.Molmo2VideoProcessor(
            size=side,
            patch_size=patch,
            pooling_size=list(POOLING_SIZE),
            do_sample_frames=False,
            do_rescale=True,
            do_normalize=True,
            do_convert_rgb=True,
        ),
        tokenizer=tokenizer,
    )


def _case() -> FamilyCase:
    from transformers import Molmo2ForConditionalGeneration

    return FamilyCase(
        name="molmo2",
        model_class=Molmo2ForConditionalGeneration,
        make_config=tiny_molmo2_config,
        build_batch=build_molmo2_batch,
        # Different frame counts and sizes (the processor resizes every frame). Four windows per frame: with nine, an
        # untrained scorer spreads a 25% budget evenly (3 windows in every frame), no two frames then fit one packed
        # row, and the suite's "fewer rows than frames" cannot hold whatever the entry does.
        videos=((3, 84, 84), (2, 56, 84)),
        units=molmo2_video_units,
        vit_tokens_per_unit=9,
        make_processor=tiny_molmo2_processor,
        video_prompt="<|video|>",
        processor_videos=((6, 64, 80), (4, 90, 60)),  # resized to the image size; lengths may differ
    )


MOLMO2 = _case()
