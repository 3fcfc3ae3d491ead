"""timm Vision Transformers (`timm.models.VisionTransformer`, any size; timm 1.0).

No language model: frames run as the model's batch, every patch is a unit (1x1; `unit_side` for larger squares),
the CLS and register tokens are never pruned, and the pruned blocks run on row-packed frames. The last block's output
is scattered back to frames, so `norm`, pooling and head run as usual: with `global_pool="token"` the logits are
exactly those of the kept tokens; with average pooling, pruned positions contribute their block k+1 features.
The downstream loss (e.g. classification) trains the scorer through the soft key bias of block k+1.

Usage: `model(x)` with `x` of shape `(videos, frames, 3, H, W)`, or `(frames, 3, H, W)` and `frames_per_video`;
the logits are per frame, `(total_frames, classes)`, and carry the call's report as `logits.stts`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from stts_adapter.registry import VisionSpec, register_architecture
from stts_adapter.selection import VideoLayout
from stts_adapter.vit import VisionOnlyViTEntry


@register_architecture
class TimmViTEntry(VisionOnlyViTEntry):
    name = "timm_vit"
    model_types = ()
    vision_blocks = "blocks"
    mask_argument = "attn_mask"
    mask_position = None  # timm calls its blocks through nn.Sequential, with x only
    pixel_argument = "x"

    def matches(self, model: nn.Module) -> bool:
        try:
            from timm.models.vision_transformer import VisionTransformer
        except ImportError:  # timm is optional
            return False
        return isinstance(model, VisionTransformer)

    def model_name(self, model: nn.Module) -> str | None:
        config = getattr(model, "pretrained_cfg", None) or {}
        return config.get("hf_hub_id") or config.get("architecture")

    def load_base_model(self, name_or_path: str, model_class: str | None, **kwargs: Any) -> nn.Module:
        """`timm.create_model` (pretrained unless `pretrained=False` is passed) of the recorded Hub id or model name.
        timm reads a Hub token from the environment (HF_TOKEN) and takes no revision: both are dropped here."""
        import timm

        kwargs.pop("token", None)
        kwargs.pop("revision", None)
        kwargs.setdefault("pretrained", True)
        if name_or_path.startswith("timm/"):  # timm's own Hub ids are its model names (with the pretrained tag)
            name_or_path = name_or_path[len("timm/") :]
        elif "/" in name_or_path and not name_or_path.startswith("hf-hub:"):
            name_or_path = "hf-hub:" + name_or_path
        return timm.create_model(name_or_path, **kwargs)

    def vision_spec(self, model: nn.Module) -> VisionSpec:
        first = getattr(model.blocks[0], "base_layer", model.blocks[0])  # wrapped once STTS is applied
        return VisionSpec(
            hidden_size=model.embed_dim,
            num_heads=first.attn.num_heads,
            mlp_size=first.mlp.fc1.out_features,
            num_blocks=len(model.blocks),
            patches_per_unit=self.unit_side**2,
        )

    def prefix_tokens(self, model: nn.Module) -> int:
        return model.num_prefix_tokens

    def patch_grid(self, model: nn.Module, inputs: dict[str, Any]) -> tuple[int, int]:
        height, width = inputs[self.pixel_argument].shape[-2:]
        patch_height, patch_width = model.patch_embed.patch_size
        return height // patch_height, width // patch_width

    def vision_tokens(self, model: nn.Module, inputs: dict[str, Any], layout: VideoLayout):
        if model.grad_checkpointing:
            raise ValueError(
                "timm's set_grad_checkpointing() re-runs the blocks outside the STTS pruning pass in the backward "
                "pass; call model.set_grad_checkpointing(False) to train with STTS."
            )
        if model.training and not isinstance(model.patch_drop, nn.Identity):
            raise ValueError("timm patch dropout (patch_drop_rate > 0) reorders tokens; set it to 0 to use STTS.")
        return super().vision_tokens(model, inputs, layout)
