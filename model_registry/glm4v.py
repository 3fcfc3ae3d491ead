"""GLM-4.1V (`Glm4vForConditionalGeneration`, module layout of transformers 5.23).

How the family is built:
- The ViT (`model.visual`) is Qwen2-VL's: all videos of a call run as ONE packed sequence, each temporal slot (2
  frames) its own attention segment (`cu_seqlens`), 2-D rotary tables per token, patches ordered 2x2 merge block by
  merge block. Before the blocks it adds learned position embeddings (bicubically interpolated to each frame's grid),
  which run on every patch and need nothing from STTS.
- The connector is `post_layernorm` (RMSNorm, per token), `downsample` (a 2x2 conv with stride 2 over the 4
  consecutive tokens of each merge block: one output per unit) and `merger` (a per-row MLP). All three are per-unit
  operations, so once the pruned units' tokens are gone the norm and the conv already run on kept units only; the
  wrapped module is `merger`, whose output is put back into the unpruned unit layout (pruned rows zero) so that
  `get_video_features` can split it per video as usual. A pruning unit is a 2x2 merge block: 4 ViT tokens, one LLM
  token; the method's "frame" is a temporal slot.
- In the LLM, video frames use the IMAGE placeholder token (`image_token_id`): the processor writes
  `<|begin_of_video|>`, then per slot `<|begin_of_image|> <|image|> x units <|end_of_image|>` and the slot's timestamp
  as text, then `<|end_of_video|>`. Only image tokens inside a `<|begin_of_video|> ... <|end_of_video|>` span are video
  placeholders (the processor's `create_mm_token_type_ids` rule); still images' placeholders, the frame and video
  markers and the timestamps are never pruned.
- Positions are 3-D M-RoPE from `Glm4vModel.get_rope_index`, which splits every video into one (1, h, w) grid per
  slot; text after a frame continues from the frame's largest position.

Mirrored transformers code: the key-biased attention of block prune_layer + 1 is `Qwen2VLEntry.attention_with_key_bias`
(a mirror of `Glm4vVisionAttention.forward`, whose q/k/v projection, `apply_rotary_pos_emb_vision` and output
projection are the same code as Qwen2.5-VL's in 5.23). Like the Qwen mirror it applies no attention dropout
(`attention_dropout`, 0.0 in the released configs), in that one block only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from stts_adapter.errors import STTSInputError
from stts_adapter.model_registry.qwen2_5_vl import Qwen2VLEntry
from stts_adapter.registry import VisionSpec, register_architecture


def video_span_mask(input_ids: torch.Tensor, video_start_id: int, video_end_id: int) -> torch.Tensor:
    """`(batch, seq)` True strictly inside `<|begin_of_video|> ... <|end_of_video|>` spans (the rule of
    `Glm4vProcessor.create_mm_token_type_ids`)."""
    starts = (input_ids == video_start_id).cumsum(-1)
    ends = (input_ids == video_end_id).cumsum(-1)
    return starts > ends


@register_architecture
class Glm4vEntry(Qwen2VLEntry):
    name = "glm4v"
    model_types = ("glm4v",)
    vision_blocks = "model.visual.blocks"
    connector = "model.visual.merger"
    block_attention = "attn"
    video_inputs = ("pixel_values_videos", "video_grid_thw")
    image_inputs = ("image_grid_thw",)
    placeholder_token = "image_token_id"

    def vision_spec(self, model: nn.Module) -> VisionSpec:
        config = model.config.vision_config
        return VisionSpec(
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            mlp_size=config.out_hidden_size,  # Glm4VisionMlp is out_hidden_size wide; intermediate_size is the merger's
            num_blocks=config.depth,
            patches_per_unit=config.spatial_merge_size**2,
        )

    # ------------------------------------------------------------------------------------------------ the LLM
    def placeholder_mask(self, model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        """Image tokens inside a video span: the video frames' placeholders (a still image's are not)."""
        config = model.config
        in_video = video_span_mask(input_ids, config.video_start_token_id, config.video_end_token_id)
        return (input_ids == config.image_token_id) & in_video

    def original_positions(self, model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        if inputs.get("position_ids") is not None:
            return inputs["position_ids"]
        if inputs.get("mm_token_type_ids") is None:  # the bare model refuses this too (compute_3d_position_ids)
            raise STTSInputError(
                "GLM-4.1V needs `mm_token_type_ids` next to videos to compute its 3-D positions; pass it as "
                "Glm4vProcessor returns it."
            )
        positions, _ = model.model.get_rope_index(
            inputs["input_ids"],
            mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=inputs.get("video_grid_thw"),
            attention_mask=inputs.get("attention_mask"),
        )
        return positions  # (3, batch, seq)

    def language_model_inputs(
        self, model: nn.Module, inputs: dict[str, Any], video_features: list[torch.Tensor]
    ) -> dict[str, Any]:
        """The base model's keyword arguments, with every image-token placeholder's features under the "image" key.

        In GLM-4.1V the LLM only has image placeholders: `Glm4vModel.get_placeholder_mask` gives images and videos
        the same mask (every `image_token_id`), so its forward refuses a batch holding both, and transformers'
        generation utilities look pre-encoded features up by `<modality>_token_id` (beam expansion, chunked prefill),
        which finds no `video_token_id` in a GLM-4.1V prompt. So the still images' features (unpruned) and the kept
        video features are interleaved in placeholder order and handed over as one "image" output, one tensor per
        batch row.

        Args:
            model: the transformers model.
            inputs (`dict`): the call's keyword arguments, per-token tensors already pruned, videos removed.
            video_features (`list[torch.Tensor]`): one `(kept_placeholders, llm_hidden_size)` tensor per video.

        Returns:
            `dict`: keyword arguments for the base model's `forward` / `generate`.
        """
        inputs = super().language_model_inputs(model, inputs, video_features)
        encoder_outputs = dict(inputs["mm_encoder_outputs"])
        encoder_outputs.pop("video")
        input_ids = inputs["input_ids"]
        is_placeholder = input_ids == model.config.image_token_id
        is_video = self.placeholder_mask(model, input_ids)[is_placeholder]  # per placeholder, in (batch, seq) order
        videos = torch.cat(video_features)
        features = videos.new_zeros(len(is_video), videos.shape[-1])
        features[is_video.to(features.device)] = videos
        images = encoder_outputs.pop("image", None)
        if images is not None:
            image_rows = torch.cat([f.reshape(-1, f.shape[-1]) for f in images.pooler_output])
            features[~is_video.to(features.device)] = image_rows.to(features)
        per_row = features.split(is_placeholder.sum(-1).tolist())
        encoder_outputs["image"] = BaseModelOutputWithPooling(pooler_output=per_row)
        inputs["mm_encoder_outputs"] = encoder_outputs
        return inputs
