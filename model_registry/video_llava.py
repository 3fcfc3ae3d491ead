"""Video-LLaVA (module layout of transformers 5.23), and the CLIP video-tower base it shares with LLaVA-NeXT-Video.

`model.video_tower` (a CLIP vision model) runs a video's frames as a batch, `(videos * frames, 1 + patches, D)`: a
CLS token then the patch grid. `VideoLlavaModel.get_video_features` projects the selected layer(s) of EVERY token,
CLS included (the feature-select strategy only applies to images), so each frame fills `1 + patches` placeholders:
the processor counts `(h // patch) * (w // patch) + 1` video tokens per frame. There is no pooling: a pruning unit
is one patch (1x1). The CLS token of every frame is never pruned: it stays in the ViT and its placeholder stays in
the LLM sequence. Images go through the separate `model.image_tower`, which STTS never touches.

`ClipVideoTowerEntry` holds what both CLIP-tower families share: the tower's blocks, the CLS prefix token of every
frame, capturing the layers named by `vision_feature_layer` and reading them back the way the 5.23
`get_video_features` of both models does, and the projector run on the kept tokens only (`project_kept`).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from stts_adapter.errors import STTSInputError
from stts_adapter.packing import FrameTokens
from stts_adapter.registry import register_architecture
from stts_adapter.runtime import VisionPruningPass
from stts_adapter.selection import VideoLayout, apply_to_kept
from stts_adapter.vit import FrameBatchViTEntry, block_of_hidden_state


class ClipVideoTowerEntry(FrameBatchViTEntry):
    """A LLaVA-style model whose videos run, frames as a batch, through a CLIP vision tower with a CLS prefix token.

    Declarations:
        video_tower: dotted path of the CLIP vision model; its blocks are `<video_tower>.encoder.layers`.

    Subclasses say which unit every patch of a frame belongs to (`unit_of_patch`) and apply the connector in
    `encode_videos` to the layers `selected_video_features` reads.
    """

    video_tower: ClassVar[str]
    video_pixels = "pixel_values_videos"
    video_inputs = ("pixel_values_videos",)
    placeholder_token = "video_token_id"
    num_prefix_tokens: ClassVar[int] = 1  # CLIP's CLS token, first in every frame

    # ------------------------------------------------------------------------------------------------ family
    def unit_of_patch(self, model: nn.Module) -> torch.Tensor:
        """*family* `(patches,)` unit (within its frame) of every patch of a row-major grid, -1 for patches that
        belong to no unit (they are never pruned)."""
        raise NotImplementedError

    def patches_per_unit(self, model: nn.Module) -> int:
        """*family* ViT patches that make one LLM token."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ shared
    def grid_side(self, model: nn.Module) -> int:
        """Patches along each side of a frame (CLIP runs square frames of `image_size` pixels)."""
        vision = model.config.vision_config
        return vision.image_size // vision.patch_size

    def units_per_frame(self, model: nn.Module) -> int:
        """Pruning units (LLM tokens, CLS aside) of one frame."""
        return int(self.unit_of_patch(model).max()) + 1

    def video_layout(self, model: nn.Module, inputs: dict[str, Any]) -> VideoLayout:
        videos, frames = inputs[self.video_pixels].shape[:2]  # one stacked tensor: every video has `frames` frames
        units = self.units_per_frame(model)
        return VideoLayout((frames,) * videos, (units,) * videos, patches_per_unit=self.patches_per_unit(model))

    def vision_tokens(self, model: nn.Module, inputs: dict[str, Any], layout: VideoLayout) -> FrameTokens:
        unit_of_patch = self.unit_of_patch(model)
        units = self.units_per_frame(model)
        prefix = torch.full((self.num_prefix_tokens,), -1, dtype=torch.long)  # CLS: outside every unit
        first_unit_of_frame = torch.arange(layout.num_frames) * units
        token_unit = torch.where(unit_of_patch >= 0, first_unit_of_frame[:, None] + unit_of_patch, -1)
        token_unit = torch.cat([prefix.expand(layout.num_frames, -1), token_unit], dim=1)
        return FrameTokens(
            token_unit=token_unit.flatten().to(self.vision_device(model)),
            num_units=layout.num_units,
            tokens_per_frame=token_unit.shape[1],
        )

    def selected_video_features(
        self, model: nn.Module, inputs: dict[str, Any], vision_pass: VisionPruningPass
    ) -> torch.Tensor:
        """Run the video tower on every frame (the block wrappers prune inside it) and read the selected layers.

        Mirrors the first half of `get_video_features` of `VideoLlavaModel` and `LlavaNextVideoModel` (transformers
        5.23): frames as a batch, `hidden_states[vision_feature_layer]`, several layers concatenated on the
        feature axis. The layers come from the pass, scattered back to the frames layout.

        Returns:
            `torch.Tensor` of shape `(videos * frames, 1 + patches, hidden_size * len(layers))`: CLS still first.
        """
        tower = model.get_submodule(self.video_tower)
        pixels = inputs[self.video_pixels]
        tower(pixels.flatten(0, 1), return_dict=True)
        depth = model.config.vision_config.num_hidden_layers
        layers = [vision_pass.captured[block_of_hidden_state(i, depth)] for i in self.feature_layers(model, inputs)]
        return layers[0] if len(layers) == 1 else torch.cat(layers, dim=-1)

    def project_kept(
        self, projector: nn.Module, tokens: torch.Tensor, vision_pass: VisionPruningPass
    ) -> list[torch.Tensor]:
        """The projector on the kept video tokens only (it maps every token alone), per video in placeholder order,
        the pruned tokens' rows zero (the core drops them with their placeholders).

        Args:
            projector (`nn.Module`): the model's multi-modal projector.
            tokens (`torch.Tensor` of shape `(videos * frames, placeholders_per_frame, hidden_size)`): the tokens that
                fill the placeholders, in their order.
            vision_pass (`VisionPruningPass`): the pass whose kept units decide.

        Returns:
            `list[torch.Tensor]`: per video, `(frames * placeholders_per_frame, llm_hidden_size)`.
        """
        keep = torch.cat(self.video_placeholder_keep(vision_pass.layout, vision_pass.keep))
        projected = apply_to_kept(projector, tokens.flatten(0, 1), keep)
        return list(projected.reshape(vision_pass.layout.num_videos, -1, projected.shape[-1]))


@register_architecture
class VideoLlavaEntry(ClipVideoTowerEntry):
    name = "video_llava"
    model_types = ("video_llava",)
    video_tower = "model.video_tower"
    vision_blocks = "model.video_tower.encoder.layers"
    image_inputs = ("vision_feature_layer", "vision_feature_select_strategy")

    def patches_per_unit(self, model: nn.Module) -> int:
        return 1

    def unit_of_patch(self, model: nn.Module) -> torch.Tensor:
        return torch.arange(self.grid_side(model) ** 2)  # no pooling: every patch is its own LLM token

    def encode_videos(
        self, model: nn.Module, inputs: dict[str, Any], vision_pass: VisionPruningPass
    ) -> list[torch.Tensor]:
        # VideoLlavaModel.get_video_features (transformers 5.23): the projector on every token, CLS included (here
        # on the kept ones). Per video: frames x (CLS, patches).
        selected = self.selected_video_features(model, inputs, vision_pass)
        return self.project_kept(model.model.multi_modal_projector, selected, vision_pass)

    def video_placeholder_units(self, layout: VideoLayout) -> list[torch.Tensor]:
        units = []
        for video_units, frames in zip(super().video_placeholder_units(layout), layout.frames_per_video):
            per_frame = video_units.view(frames, -1)
            cls = per_frame.new_full((frames, self.num_prefix_tokens), -1)  # every frame's CLS placeholder stays
            units.append(torch.cat([cls, per_frame], dim=1).flatten())
        return units

    def language_model_inputs(
        self, model: nn.Module, inputs: dict[str, Any], video_features: list[torch.Tensor]
    ) -> dict[str, Any]:
        # The 5.23 image processor still returns images as `pixel_values_images` by default; the model renames that
        # keyword to `pixel_values` (`deprecate_kwarg` on its forward). Rename it first, so that the core encodes the
        # images next to the kept video features instead of the forward seeing both pixels and encoder outputs.
        inputs = dict(inputs)
        legacy = inputs.pop("pixel_values_images", None)
        if legacy is not None:
            if inputs.get("pixel_values") is not None:
                raise STTSInputError("Pass the images once: as pixel_values or as pixel_values_images, not both.")
            inputs["pixel_values"] = legacy
        return super().language_model_inputs(model, inputs, video_features)

    def video_encoder_output(self, video_features: list[torch.Tensor]) -> BaseModelOutputWithPooling:
        # The model reads ONE tensor whose first two axes it flattens (5.23: `(frames, tokens, D)`).
        return BaseModelOutputWithPooling(pooler_output=torch.cat(video_features)[None])
