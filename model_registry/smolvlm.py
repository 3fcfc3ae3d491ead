"""SmolVLM and SmolVLM2 (`SmolVLMForConditionalGeneration`, module layout of transformers 5.23).

How the family is built:
    `model.vision_model` is an Idefics3-style SigLIP ViT without CLS token (blocks at
    `model.vision_model.encoder.layers`, called as `layer(hidden_states, attention_mask)`) that runs every image as
    one element of a batch. The connector pixel-shuffles each image's square patch grid by `config.scale_factor` (s x s
    patches -> one token; 4x4 in SmolVLM2-256M/500M, 3x3 in SmolVLM2-2.2B) and projects it. Still images and video
    frames travel in the SAME input, `pixel_values (rows, images, 3, H, W)` with `pixel_attention_mask (rows, images,
    H, W)`; the model drops all-zero padding images, and fills the `image_token_id` placeholders in order. The SmolVLM2
    processor lays out a video as an intro text, then per frame a timestamp text ("Frame from 00:01:") followed by
    `<fake_token_around_image><global-img>`, `image_seq_len` `<image>` placeholders and `<fake_token_around_image>`.
    The LLM (Llama-style) uses 1-D RoPE.

Telling videos from still images:
    Nothing the SmolVLM2 processor returns tells them apart: video frames use the image key, the image placeholder
    token and the same per-frame layout as an unsplit image, and the processor drops `video_metadata`. The processor
    call knows it, so `stts_adapter.prepare_inputs(processor, model, text=..., videos=...)` runs the processor and
    adds the one keyword STTS needs:

        `pixel_values_is_video` (`torch.BoolTensor` of shape `(rows,)`): True for every row of `pixel_values` that
        holds one video, whose real (not all-zero) images are its frames, in order.

    (The processor makes one row per video when given videos, and cannot take images and videos in one call.) A batch
    without the keyword whose rows hold several images (a video's frames, or image crops) runs the bare model with a
    warning, once per model, that names the fix; with the keyword and no True row it is the bare model silently.
    Rows that are not videos hold still images (image crops), and they are NEVER pruned: in a batch that mixes video
    rows and image rows, the images run through the ViT with the frames (the model's own ViT batch) but belong to no
    pruning unit, get no key bias, and keep all their placeholders. Rows are in placeholder order (a sample with an
    image and a video has its image row before its video row).

Pruning:
    A unit is one pixel-shuffle cell: s x s patches, one LLM placeholder. The key bias and, after pruning, the
    block-diagonal mask of the packed rows go in through the blocks' attention-mask argument (`FrameBatchViTEntry`).
    The pixel shuffle needs each image's full grid: the last block is scattered back to the images layout (pruned
    cells hold their block prune_layer + 1 features), the model's `post_layernorm` and connector run on it, and the
    placeholders of pruned cells are dropped afterwards. Intro text, timestamps, `<fake_token_around_image>` and
    `<global-img>` are text to the core and always stay.

Limits:
    A pruned batch needs unpadded images (its `pixel_attention_mask`, when given, is all ones on every real image),
    as the SmolVLM2 processors make them: a padded image would hand the ViT blocks a padding mask, which the core's
    `FrameBatchViTEntry` cannot combine with the key bias yet. Still images that are padded can go in a batch of their
    own (it is never pruned).

Mirrored code: `encode_videos` follows `SmolVLMModel.get_image_features` of transformers 5.23 (drop the all-zero
padding images, run `vision_model`, apply the connector, split the features per row), reading the last block from
the pass and applying `vision_model.post_layernorm` to it as `SmolVLMVisionTransformer.forward` does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from stts_adapter.errors import STTSInputError
from stts_adapter.packing import FrameTokens
from stts_adapter.registry import register_architecture
from stts_adapter.runtime import VisionPruningPass
from stts_adapter.selection import VideoLayout
from stts_adapter.vit import FrameBatchViTEntry

IS_VIDEO = "pixel_values_is_video"
"""Keyword marking the rows of `pixel_values` that are videos (see the module docstring)."""


def pixel_shuffle_units(side: int, scale_factor: int) -> torch.Tensor:
    """`(side * side,)` pixel-shuffle cell of every patch of a row-major `side x side` grid.

    `SmolVLMConnector.pixel_shuffle` turns the `scale_factor x scale_factor` block of patches at cell row `i`, cell
    column `j` into output token `i * (side // scale_factor) + j`; this is that token's index for every patch.
    """
    index = torch.arange(side) // scale_factor
    return (index[:, None] * (side // scale_factor) + index[None, :]).flatten()


@dataclass(frozen=True)
class SmolVLMLayout(VideoLayout):
    """A batch's videos, plus the rows of `pixel_values` they share with still images.

    Args:
        row_is_video (`tuple[bool, ...]`): per row of `pixel_values`, whether it holds a video.
        images_per_row (`tuple[int, ...]`): real (not all-zero) images of every row.
        real_images (`tuple[bool, ...]`): per image slot of the flattened `(rows, images)`, whether it is real.
        tokens_per_image (`int`): LLM placeholders of one image (its pixel-shuffle cells).
    """

    row_is_video: tuple[bool, ...] = ()
    images_per_row: tuple[int, ...] = ()
    real_images: tuple[bool, ...] = ()
    tokens_per_image: int = 0


@register_architecture
class SmolVLMEntry(FrameBatchViTEntry):
    name = "smolvlm"
    model_types = ("smolvlm",)
    vision_blocks = "model.vision_model.encoder.layers"
    video_pixels = "pixel_values"
    video_inputs = ("pixel_values", "pixel_attention_mask", IS_VIDEO)
    stts_only_inputs = (IS_VIDEO,)
    placeholder_token = "image_token_id"  # frames and still images share it

    def patches_per_unit(self, model: nn.Module) -> int:
        return model.config.scale_factor**2

    def has_videos(self, inputs: dict[str, Any]) -> bool:
        is_video = inputs.get(IS_VIDEO)
        return inputs.get("pixel_values") is not None and is_video is not None and bool(torch.as_tensor(is_video).any())

    def unmarked_videos(self, model: nn.Module, inputs: dict[str, Any]) -> str | None:
        pixels = inputs.get("pixel_values")
        if pixels is None or inputs.get(IS_VIDEO) is not None or pixels.ndim != 5:
            return None
        images_per_row = pixels.flatten(2).ne(0).any(-1).sum(1)  # real images: frames, crops or still images
        if not bool((images_per_row > 1).any()):
            return None
        return (
            "SmolVLM's processor puts video frames and still images into the same pixel_values, and this batch has "
            "rows of several images that may be a video's frames. Make the inputs with "
            "stts_adapter.prepare_inputs(processor, model, text=..., videos=...), or add "
            f"inputs['{IS_VIDEO}'] = a bool tensor with one flag per row of pixel_values (True: a video). "
            f"Pass {IS_VIDEO}=torch.zeros(rows, dtype=torch.bool) for still images to silence this warning."
        )

    def mark_videos(
        self, processor: Any, inputs: dict[str, Any], text: list[str], images: bool, videos: bool
    ) -> dict[str, Any]:
        """SmolVLM2's processor makes one row of `pixel_values` per video when given videos, one per prompt when
        given images, and cannot take both in one call (transformers 5.24 keeps the videos' pixels and drops the
        images' under their shared key): every row is a video, or none is."""
        if images and videos:
            raise STTSInputError(
                "SmolVLM's processor cannot take images and videos in one call (both go to pixel_values and one is "
                "lost). Process them in separate calls; a batch mixing both needs its own "
                f"{IS_VIDEO} (one flag per row of pixel_values)."
            )
        if inputs.get("pixel_values") is not None:
            rows = inputs["pixel_values"].shape[0]
            inputs[IS_VIDEO] = torch.full((rows,), videos, dtype=torch.bool)
        return inputs

    # ------------------------------------------------------------------------------------------------ the ViT
    def video_layout(self, model: nn.Module, inputs: dict[str, Any]) -> SmolVLMLayout:
        pixels = inputs["pixel_values"]
        if pixels.ndim != 5:
            raise STTSInputError(
                f"SmolVLM expects pixel_values of shape (rows, images, 3, height, width), got {tuple(pixels.shape)}; "
                "pass the processor's output unchanged."
            )
        rows = pixels.shape[0]
        is_video = torch.as_tensor(inputs[IS_VIDEO]).bool().flatten().tolist()
        if len(is_video) != rows:
            raise STTSInputError(
                f"{IS_VIDEO} needs one flag per row of pixel_values ({rows} rows), got {len(is_video)}."
            )
        side = self._grid_side(model, pixels)
        # SmolVLMModel.get_image_features drops the images that are all zero (after the cast to the model's dtype).
        real = pixels.to(model.dtype).flatten(2).ne(0).any(-1)  # (rows, images)
        mask = inputs.get("pixel_attention_mask")
        if mask is not None and not bool(mask.bool()[real.to(mask.device)].all()):
            raise STTSInputError(
                "This batch holds padded images (pixel_attention_mask has zeros on a real image): STTS prunes SmolVLM "
                "videos in batches of unpadded images only, as the SmolVLM2 processors make them. Put padded still "
                "images in a batch without videos."
            )
        images_per_row = real.sum(1).tolist()
        frames = [n for n, video in zip(images_per_row, is_video) if video]
        if 0 in frames:
            raise STTSInputError(f"A row marked as a video in {IS_VIDEO} holds no frame (all its images are zero).")
        cells = (side // model.config.scale_factor) ** 2
        return SmolVLMLayout(
            frames_per_video=tuple(frames),
            units_per_frame=(cells,) * len(frames),
            patches_per_unit=model.config.scale_factor**2,
            row_is_video=tuple(is_video),
            images_per_row=tuple(images_per_row),
            real_images=tuple(real.flatten().tolist()),
            tokens_per_image=cells,
        )

    def _grid_side(self, model: nn.Module, pixels: torch.Tensor) -> int:
        height, width = pixels.shape[-2:]
        patch, scale = model.config.vision_config.patch_size, model.config.scale_factor
        if height != width or height % patch or (height // patch) % scale:
            raise STTSInputError(
                f"SmolVLM images must be square with a patch grid that scale_factor={scale} divides (patch size "
                f"{patch}), as the processor makes them; got {height}x{width} pixels."
            )
        return height // patch

    def vision_tokens(self, model: nn.Module, inputs: dict[str, Any], layout: SmolVLMLayout) -> FrameTokens:
        side = self._grid_side(model, inputs["pixel_values"])
        unit_in_frame = pixel_shuffle_units(side, model.config.scale_factor)
        # The ViT batch is every real image in row order; frames of video rows own units, still images none (-1).
        is_frame = torch.tensor(
            [video for video, n in zip(layout.row_is_video, layout.images_per_row) for _ in range(n)], dtype=torch.bool
        )
        token_unit = torch.full((len(is_frame), side * side), -1, dtype=torch.long)
        first_unit = torch.arange(layout.num_frames) * layout.tokens_per_image
        token_unit[is_frame] = first_unit[:, None] + unit_in_frame[None, :]
        return FrameTokens(
            token_unit=token_unit.flatten().to(self.vision_device(model)),
            num_units=layout.num_units,
            tokens_per_frame=side * side,
        )

    def encode_videos(
        self, model: nn.Module, inputs: dict[str, Any], vision_pass: VisionPruningPass
    ) -> list[torch.Tensor]:
        # SmolVLMModel.get_image_features (transformers 5.23), reading the scattered-back last block. The images are
        # unpadded (checked in video_layout), so the patch attention mask is all ones: the ViT's default.
        core = model.model
        layout: SmolVLMLayout = vision_pass.layout
        pixels = inputs["pixel_values"].to(core.dtype)
        real = torch.tensor(layout.real_images, device=pixels.device)
        core.vision_model(pixel_values=pixels.flatten(0, 1)[real], return_dict=True)
        last = vision_pass.captured[self.vision_spec(model).num_blocks - 1]
        features = core.connector(core.vision_model.post_layernorm(last))  # (images, cells, llm_hidden)
        return [row.flatten(0, 1) for row in features.split(list(layout.images_per_row))]

    # ------------------------------------------------------------------------------------------------ the LLM
    def video_placeholder_units(self, layout: SmolVLMLayout) -> list[torch.Tensor]:
        """Per row of `pixel_values` (videos and still images alike, in placeholder order), the unit each placeholder
        shows: a video's units, none for a still image's (they always stay)."""
        videos = iter(super().video_placeholder_units(layout))
        return [
            next(videos) if video else torch.full((n * layout.tokens_per_image,), -1, dtype=torch.long)
            for video, n in zip(layout.row_is_video, layout.images_per_row)
        ]

    def language_model_inputs(
        self, model: nn.Module, inputs: dict[str, Any], video_features: list[torch.Tensor]
    ) -> dict[str, Any]:
        """The base model's keyword arguments with the kept features as precomputed image features.

        SmolVLM reads every vision feature, video frame or still image, from `mm_encoder_outputs["image"]` and
        scatters them into the `image_token_id` placeholders in order, so `video_features` holds one tensor per row of
        `pixel_values` (see `video_placeholder_units`), still images included.
        """
        inputs = dict(inputs)
        features = BaseModelOutputWithPooling(pooler_output=torch.cat(video_features))
        inputs["mm_encoder_outputs"] = {"image": features}
        return inputs
