"""The LLM key bias (ours, `STTSConfig.llm_key_bias_weight`): a second path from the LM loss to the scorer.

The paper's soft key bias sits in ViT block prune_layer + 1, where every unit is still present and each frame's scores
are rescaled on their own: its gradient orders the units within a frame and says what a unit is worth next to all
the others. This bias sits in every attention layer of the LLM, on the kept video tokens, and is worth exactly 0:
`weight x (logit - logit.detach())`. The outputs do not change; the gradient brings to each kept unit's logit how much
the LM loss gains from attending more to its token, compared across frames and under the pruned set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .errors import STTSConfigError

_ACTIVE_BIAS: ContextVar[_ActiveBias | None] = ContextVar("stts_llm_key_bias", default=None)


class _ActiveBias:
    """The bias of one call and the biased masks built from it. Every layer (of one attention type) gets the same
    mask from the LLM, so each is built once per call, not once per layer."""

    def __init__(self, bias: torch.Tensor) -> None:
        self.bias = bias  # (batch, length)
        self._masks: dict[tuple, tuple[torch.Tensor | None, torch.Tensor]] = {}

    def biased_mask(self, mask: torch.Tensor | None, hidden_states: torch.Tensor) -> torch.Tensor:
        key = (id(mask), hidden_states.shape[1], hidden_states.dtype)
        if key not in self._masks:  # the mask is kept with its result: its id cannot be reused meanwhile
            biased = additive_mask(mask, hidden_states) + self.bias[:, None, None, :].to(hidden_states.dtype)
            self._masks[key] = (mask, biased)
        return self._masks[key][1]


def llm_key_bias(
    logits: torch.Tensor, placeholder_units: torch.Tensor, placeholders: torch.Tensor, weight: float
) -> torch.Tensor:
    """The per-token key bias of the LLM's pruned sequence: `weight x (logit - logit.detach())` on the placeholder of
    each kept unit (0 in value, the unit's logit in gradient), 0 elsewhere.

    Args:
        logits (`torch.Tensor` of shape `(num_units,)`): the scorer's logits, in layout order.
        placeholder_units (`torch.Tensor` of shape `(kept_placeholders,)`, long): the unit each placeholder left in
            the pruned sequence shows, in sequence order (row after row), -1 for those that show none (a newline, a
            CLS, an image tile).
        placeholders (`torch.Tensor` of shape `(batch, pruned_length)`, bool): where those placeholders are.
        weight (`float`): the gradient's scale.

    Returns:
        `torch.Tensor` of shape `(batch, pruned_length)`, float32, all zeros in value.
    """
    if int(placeholders.sum()) != placeholder_units.numel():
        raise RuntimeError(
            f"The pruned sequence holds {int(placeholders.sum())} placeholders where the pruning left "
            f"{placeholder_units.numel()}."
        )
    logits = logits.float()
    shows_unit = placeholder_units >= 0
    unit_logits = logits[placeholder_units.clamp(min=0)]
    values = torch.where(shows_unit, weight * (unit_logits - unit_logits.detach()), torch.zeros_like(unit_logits))
    bias = torch.zeros(placeholders.shape, dtype=values.dtype, device=values.device)
    return bias.masked_scatter(placeholders.to(values.device), values)


@contextlib.contextmanager
def active_llm_key_bias(bias: torch.Tensor | None) -> Iterator[None]:
    """Within this context (this thread / task only) the hooked LLM layers add `bias` on the key side."""
    token = _ACTIVE_BIAS.set(None if bias is None else _ActiveBias(bias))
    try:
        yield
    finally:
        _ACTIVE_BIAS.reset(token)


def llm_decoder_layers(transformers_model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a VLM's LLM, checked for the LLM key bias (nothing is hooked yet).

    Args:
        transformers_model (`nn.Module`): a transformers VLM (`get_decoder()` gives its LLM, whose `layers` are the
            decoder layers).

    Returns:
        `nn.ModuleList`: the layers.

    Raises:
        `STTSConfigError`: the LLM runs flash attention (no additive mask) or has no `layers`.
    """
    attention = getattr(transformers_model.config, "_attn_implementation", None) or ""
    if "flash" in attention:
        raise STTSConfigError(
            f"STTSConfig.llm_key_bias_weight > 0 needs an LLM attention that takes an additive mask; this model runs "
            f"{attention!r}. Load it with attn_implementation='sdpa' (or 'eager') for training, or set "
            "llm_key_bias_weight=0."
        )
    decoder = transformers_model.get_decoder() if hasattr(transformers_model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise STTSConfigError(
            f"STTSConfig.llm_key_bias_weight > 0: cannot find the decoder layers of {type(transformers_model).__name__}"
            "'s LLM (get_decoder().layers); set llm_key_bias_weight=0."
        )
    return layers


def attach_llm_key_bias(layers: nn.ModuleList | None) -> list[RemovableHandle]:
    """Hook every layer so that it adds the active bias (`active_llm_key_bias`) to its attention mask.

    Args:
        layers (`nn.ModuleList`, *optional*): `llm_decoder_layers`; None: nothing to hook.

    Returns:
        `list[RemovableHandle]`: one per layer; `.remove()` them to detach.
    """
    return [layer.register_forward_pre_hook(_add_active_bias, with_kwargs=True) for layer in layers or ()]


def _add_active_bias(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict] | None:
    active = _ACTIVE_BIAS.get()
    if active is None:
        return None
    hidden_states = args[0] if args else kwargs["hidden_states"]
    kwargs["attention_mask"] = active.biased_mask(kwargs.get("attention_mask"), hidden_states)
    return args, kwargs


def additive_mask(mask: torch.Tensor | None, hidden_states: torch.Tensor) -> torch.Tensor:
    """A decoder layer's attention mask as an additive float mask of shape `(batch or 1, 1, queries, keys)`.

    Args:
        mask (`torch.Tensor`, *optional*): what the LLM hands its layers: None (causal, no padding: sdpa's
            `is_causal` path), a boolean mask (True = attend) or an additive float mask, 4-D.
        hidden_states (`torch.Tensor` of shape `(batch, length, hidden)`): the layer's input (length and dtype).

    Returns:
        `torch.Tensor`: 0 where a query attends to a key, the dtype's lowest value where it does not.
    """
    length, dtype, device = hidden_states.shape[1], hidden_states.dtype, hidden_states.device
    if mask is None:
        mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=device).masked_fill(~mask, torch.finfo(dtype).min)
    return mask.to(dtype)
