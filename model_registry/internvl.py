"""InternVL (`InternVLForConditionalGeneration`, model_type "internvl"; module layout of transformers 5.23).

How the family is built:
- The ViT (`model.vision_tower`, InternViT) puts a CLS token in front of every frame's patches (`N = 1 + h * w`
  tokens) and runs frames as a batch `(frames, N, dim)` through `encoder.layer` (note: `.layer`).
- The connector is `InternVLModel.get_image_features`: take `vision_feature_layer` (-1: the tower's normed last
  output), drop the CLS token ("default" strategy), `pixel_shuffle` the square grid with `downsample_ratio` (0.5: every
  2x2 cell of patches becomes one token, row-major over the cells) and project with `multi_modal_projector`. A
  pruning unit is that cell: `1 / downsample_ratio` squared patches, one LLM token. The CLS token is never pruned.
- The processor (`InternVLProcessor`) turns a video into frames that it MERGES into `pixel_values`, interleaved with
  the tiles of still images in text order; it writes every frame as `Frame{i}: <img><IMG_CONTEXT> x L</img>` (frames
  joined by a newline) and every image as one `<img><IMG_CONTEXT> x (L * tiles)</img>`, where `IMG_CONTEXT` is
  `image_token_id` for both and `L = image_seq_length` placeholders per tile or frame. There is no
  `pixel_values_videos` and no video token: the model cannot tell a frame from an image tile. STTS therefore needs
  the one thing the processor drops, `pixel_values_video_index`: for every row of `pixel_values`, the video it is a
  frame of (0, 1, ... in text order), -1 for an image tile. `stts_adapter.prepare_inputs(processor, model, ...)`
  runs the processor and adds it (`mark_videos`: the prompts' image and video tokens, in order, against the runs of
  placeholders). Without it a call runs the bare model, with a warning (once per model) that names the fix when a
  prompt holds several one-tile placeholder runs (frames, or one-tile images); with it and no video row, silently.
  Only video frames' placeholders are pruned; image tiles, the frame texts and `<img>`/`</img>` never are.
- Image tiles and video frames run through the tower together in one call, as in the bare model; the tiles' tokens
  belong to no unit, so they are never scored nor pruned and keep their full rows after packing.
- The language model (Qwen2 / Llama style) uses 1-D RoPE: the core's default positions.
- `InternVLVisionLayer.forward` takes the hidden states only (no attention mask, unlike SigLIP / CLIP layers), while
  its `attention` takes an additive `attention_mask`: the key bias and the packed rows' block-diagonal mask go to
  the attention (`mask_attention`, wrapped by the core). The vision layers cannot be gradient-checkpointed while
  pruning (their recompute would run without the mask): that raises.

Mirrored transformers code: `encode_videos` mirrors `InternVLModel.get_image_features` of transformers 5.23 (feature
layer, CLS drop, `pixel_shuffle`, `multi_modal_projector`), reading the captured layer in the unpruned layout and
projecting kept units only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from stts_adapter.errors import STTSInputError
from stts_adapter.packing import FrameTokens
from stts_adapter.registry import register_architecture
from stts_adapter.runtime import VisionPruningPass
from stts_adapter.selection import VideoLayout, apply_to_kept
from stts_adapter.vit import FrameBatchViTEntry, block_of_hidden_state

PIXEL_VIDEO_INDEX = "pixel_values_video_index"
"""Input naming, for every row of `pixel_values`, the video it is a frame of (-1: an image tile)."""


def placeholder_runs(input_ids: Any, token_id: int) -> list[list[int]]:
    """Per prompt, the lengths of its runs of consecutive `token_id`, in order."""
    runs = []
    for row in input_ids:
        is_token = torch.as_tensor(row) == token_id
        edges = torch.diff(is_token.int(), prepend=is_token.new_zeros(1).int(), append=is_token.new_zeros(1).int())
        starts, ends = (edges == 1).nonzero().flatten(), (edges == -1).nonzero().flatten()
        runs.append((ends - starts).tolist())
    return runs


@dataclass(frozen=True)
class InternVLLayout(VideoLayout):
    """A `VideoLayout` that also knows the rows of `pixel_values`, since InternVL fills the placeholders of image
    tiles and video frames from one sequence.

    Args:
        video_of_row (`tuple[int, ...]`): for every row of `pixel_values`, its video (-1 for an image tile).
    """

    video_of_row: tuple[int, ...] = ()

    @property
    def is_video_row(self) -> torch.Tensor:
        """`(rows,)` bool: the rows that are video frames."""
        return torch.tensor(self.video_of_row, dtype=torch.long) >= 0


@register_architecture
class InternVLEntry(FrameBatchViTEntry):
    """InternVL: InternViT frames as a batch with a CLS token, 2x2 pixel-shuffle cells as units, videos told apart
    from image tiles by `pixel_values_video_index` (see the module docstring)."""

    name = "internvl"
    model_types = ("internvl",)
    vision_blocks = "model.vision_tower.encoder.layer"
    video_pixels = "pixel_values"
    # The frames share `pixel_values` with the image tiles; `encode_videos` encodes both, so both keys are consumed.
    video_inputs = ("pixel_values", PIXEL_VIDEO_INDEX)
    stts_only_inputs = (PIXEL_VIDEO_INDEX,)
    placeholder_token = "image_token_id"  # frames and tiles alike; `video_placeholder_units` says which are frames'
    mask_argument = None  # the layers take the hidden states only ...
    mask_attention = "attention"  # ... and their self-attention takes the mask

    def patches_per_unit(self, model: nn.Module) -> int:
        return self.cell_side(model) ** 2

    def cell_side(self, model: nn.Module) -> int:
        """Side, in patches, of a pixel-shuffle cell (2 for the released `downsample_ratio` 0.5)."""
        return round(1 / model.config.downsample_ratio)

    def _grid(self, model: nn.Module, pixels: torch.Tensor) -> tuple[int, int]:
        patch = model.config.vision_config.patch_size
        return pixels.shape[-2] // patch[0], pixels.shape[-1] // patch[1]

    def feature_layers(self, model: nn.Module, inputs: dict[str, Any] | None = None) -> list[int]:
        layers = super().feature_layers(model, inputs)
        if len(layers) != 1:  # get_image_features of 5.23 indexes hidden_states with it
            raise STTSInputError(f"InternVL's vision_feature_layer must be one int, got {layers!r}.")
        return layers

    # ------------------------------------------------------------------------------------------------ videos
    def _video_of_row(self, inputs: dict[str, Any]) -> list[int]:
        index = inputs.get(PIXEL_VIDEO_INDEX)
        if index is None:
            return []
        return [int(v) for v in torch.as_tensor(index).flatten().tolist()]

    def has_videos(self, inputs: dict[str, Any]) -> bool:
        return inputs.get("pixel_values") is not None and any(v >= 0 for v in self._video_of_row(inputs))

    def unmarked_videos(self, model: nn.Module, inputs: dict[str, Any]) -> str | None:
        if inputs.get("pixel_values") is None or inputs.get("input_ids") is None or PIXEL_VIDEO_INDEX in inputs:
            return None
        # A frame is one run of image_seq_length placeholders; an image is one run of that many per tile. Two
        # one-tile runs in a prompt may be a video's frames.
        one_tile = model.config.image_seq_length
        runs = placeholder_runs(inputs["input_ids"], model.config.image_token_id)
        if not any(sum(n == one_tile for n in row) > 1 for row in runs):
            return None
        return (
            "InternVL's processor merges video frames into pixel_values with the image tiles, and this batch has "
            "prompts with several one-tile placeholder runs, which may be a video's frames. Make the inputs with "
            "stts_adapter.prepare_inputs(processor, model, text=..., videos=...), or add "
            f"inputs['{PIXEL_VIDEO_INDEX}'] = per row of pixel_values its video's index (0, 1, ...; -1 for an image "
            f"tile). Pass {PIXEL_VIDEO_INDEX}=torch.full((rows,), -1) for still images to silence this warning."
        )

    def mark_videos(
        self, processor: Any, inputs: dict[str, Any], text: list[str], images: bool, videos: bool
    ) -> dict[str, Any]:
        """`InternVLProcessor` (transformers 5.24) fills `pixel_values` in the order of the prompts' image and video
        tokens: an image's tiles (one placeholder run of `image_seq_length` per tile), then a video's frames (one
        run each, the same count for every video of a call). Walking the runs in that order gives every row its
        video."""
        if inputs.get("pixel_values") is None:
            return inputs
        image_token, video_token = re.escape(processor.image_token), re.escape(processor.video_token)
        pattern = re.compile(f"(?P<image>{image_token})|(?P<video>{video_token})")
        visuals = [match.lastgroup for prompt in text for match in pattern.finditer(prompt)]
        runs = [n for row in placeholder_runs(inputs["input_ids"], processor.image_token_id) for n in row]
        one_tile, num_videos = processor.image_seq_length, visuals.count("video")
        frames = (len(runs) - visuals.count("image")) // max(1, num_videos)
        video_of_row: list[int] = []
        run, video = iter(runs), 0
        for visual in visuals:
            if visual == "image":
                video_of_row += [-1] * (next(run, 0) // one_tile)
            else:
                video_of_row += [video] * sum(1 for _ in zip(range(frames), run))
                video += 1
        rows = inputs["pixel_values"].shape[0]
        if len(video_of_row) != rows:
            raise STTSInputError(
                f"Could not match the {rows} rows of pixel_values to the prompts' {len(visuals)} images and videos "
                f"(found {len(video_of_row)}); was the text truncated? Add {PIXEL_VIDEO_INDEX} yourself."
            )
        inputs[PIXEL_VIDEO_INDEX] = torch.tensor(video_of_row, dtype=torch.long)
        return inputs

    def video_layout(self, model: nn.Module, inputs: dict[str, Any]) -> InternVLLayout:
        pixels = inputs["pixel_values"]
        video_of_row = self._video_of_row(inputs)
        if len(video_of_row) != pixels.shape[0]:
            raise STTSInputError(
                f"{PIXEL_VIDEO_INDEX} has {len(video_of_row)} entries but pixel_values has {pixels.shape[0]} rows; "
                "give every row of pixel_values its video (-1 for an image tile)."
            )
        frames: list[int] = []
        previous = -1
        for video in video_of_row:
            if video >= 0 and video == previous:
                frames[-1] += 1
            elif video == len(frames):
                frames.append(1)  # the next video starts
            elif video >= 0:
                raise STTSInputError(
                    f"{PIXEL_VIDEO_INDEX} must number the videos 0, 1, ... in the order they appear in pixel_values, "
                    f"each video's frames in consecutive rows; got {video_of_row}."
                )
            previous = video
        rows, columns = self._grid(model, pixels)
        cell = self.cell_side(model)
        return InternVLLayout(
            frames_per_video=tuple(frames),
            units_per_frame=((rows // cell) * (columns // cell),) * len(frames),
            patches_per_unit=cell * cell,
            video_of_row=tuple(video_of_row),
        )

    def vision_tokens(self, model: nn.Module, inputs: dict[str, Any], layout: InternVLLayout) -> FrameTokens:
        rows, columns = self._grid(model, inputs["pixel_values"])
        cell = self.cell_side(model)
        # Unit of every patch: its pixel-shuffle cell, row-major over the cells (the order of the placeholders).
        unit_in_frame = (torch.arange(rows)[:, None] // cell) * (columns // cell) + torch.arange(columns) // cell
        unit_in_frame = torch.cat([torch.tensor([-1]), unit_in_frame.flatten()])  # the CLS token is never pruned
        units = layout.units_per_frame[0]
        is_video = layout.is_video_row
        first_unit = (torch.cumsum(is_video.long(), 0) - 1) * units  # of every row, in the flat unit layout
        token_unit = torch.where(is_video[:, None] & (unit_in_frame >= 0), first_unit[:, None] + unit_in_frame, -1)
        return FrameTokens(
            token_unit=token_unit.flatten().to(self.vision_device(model)),
            num_units=layout.num_units,
            tokens_per_frame=1 + rows * columns,
        )

    def encode_videos(
        self, model: nn.Module, inputs: dict[str, Any], vision_pass: VisionPruningPass
    ) -> list[torch.Tensor]:
        """Every placeholder's features, tiles and frames alike, in `pixel_values` order (one tensor): InternVL fills
        them from one sequence. Pruned units' rows are zero."""
        # InternVLModel.get_image_features (transformers 5.23), reading the captured layer (scattered back).
        core = model.model
        (layer,) = self.feature_layers(model)
        core.vision_tower(pixel_values=inputs["pixel_values"].to(dtype=core.dtype), return_dict=True)
        depth = model.config.vision_config.num_hidden_layers
        features = vision_pass.captured[block_of_hidden_state(layer, depth)]
        if layer == -1:  # get_image_features reads `last_hidden_state`, after the tower's final norm
            features = core.vision_tower.layernorm(features)
        strategy = inputs.get("vision_feature_select_strategy") or model.config.vision_feature_select_strategy
        if strategy == "default":
            features = features[:, 1:, :]
        side = int(features.shape[1] ** 0.5)
        features = features.reshape(features.shape[0], side, side, -1)
        features = core.pixel_shuffle(features, scale_factor=model.config.downsample_ratio)
        features = features.reshape(-1, features.shape[-1])  # (rows * units, dim): the placeholders, in order
        (keep,) = self.video_placeholder_keep(vision_pass.layout, vision_pass.keep)
        return [apply_to_kept(core.multi_modal_projector, features, keep)]  # the connector sees kept units only

    # ------------------------------------------------------------------------------------------------ the LLM
    def video_placeholder_units(self, layout: InternVLLayout) -> list[torch.Tensor]:
        """One tensor over every `image_token_id` placeholder of the batch, in fill order: image tiles' show no unit
        (they always stay), video frames' show their units."""
        per_row = layout.units_per_frame[0]
        units = torch.full((len(layout.is_video_row), per_row), -1, dtype=torch.long)
        units[layout.is_video_row.cpu()] = torch.arange(layout.num_units).view(-1, per_row)
        return [units.flatten()]

    def language_model_inputs(
        self, model: nn.Module, inputs: dict[str, Any], video_features: list[torch.Tensor]
    ) -> dict[str, Any]:
        # InternVLModel.forward fills every `image_token_id` placeholder, in order, from mm_encoder_outputs["image"].
        inputs = dict(inputs)
        (features,) = video_features
        inputs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=features[None])}
        return inputs
