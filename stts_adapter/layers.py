"""Wrappers that `apply_stts` puts around a model's ViT blocks, one attention and the connector.

Each keeps the original module as `base_layer` (the PEFT way) and, outside a pruning pass, simply calls it, so the
wrapped model behaves exactly as before. The wrappers are invisible in `state_dict()` (the `base_layer.` level is
stripped on save and re-added on load) and in the names `named_modules()` / `named_parameters()` give, so the base
model's checkpoint keys and module names do not change while STTS is applied (PEFT saves and loads a LoRA adapter of
a model STTS wraps under the names of the bare model).
`unload()` puts the original modules back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .registry import KEY_BIAS_KWARG
from .runtime import active_pass

_BASE = "base_layer."


class BaseLayerWrapper(nn.Module):
    """A module standing in for `base_layer`, transparent to `state_dict` and `load_state_dict`."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.register_state_dict_post_hook(_strip_base_prefix)
        self.register_load_state_dict_pre_hook(_add_base_prefix)

    def named_modules(self, memo: set | None = None, prefix: str = "", remove_duplicate: bool = True):
        """The wrapper and `base_layer` both stand at the wrapped module's name and everything inside keeps the name
        it has in the unwrapped model, as in `state_dict()`: tools that match module or parameter names against state
        dict keys (PEFT's adapter saving, optimizers, FSDP) see the base model's names."""
        if memo is None:
            memo = set()
        if remove_duplicate:
            if self in memo:
                return
            memo.add(self)
        yield prefix, self
        yield from self.base_layer.named_modules(memo, prefix, remove_duplicate)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_layer":
                raise
            return getattr(self.base_layer, name)  # `get_submodule` follows the names `named_modules` gives


def _strip_base_prefix(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + _BASE)]:
        state_dict[prefix + key[len(prefix) + len(_BASE) :]] = state_dict.pop(key)


def _add_base_prefix(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    for key in [k for k in state_dict if k.startswith(prefix) and not k.startswith(prefix + _BASE)]:
        state_dict[prefix + _BASE + key[len(prefix) :]] = state_dict.pop(key)


class STTSBlock(BaseLayerWrapper):
    """A ViT block: inside a pruning pass, the pass decides how it runs (scored, biased, or on kept tokens)."""

    def __init__(self, base_layer: nn.Module, block_index: int) -> None:
        super().__init__(base_layer)
        self.block_index = block_index

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        vision_pass = active_pass()
        if vision_pass is None:
            return self.base_layer(*args, **kwargs)
        return vision_pass.run_block(self.block_index, self.base_layer, args, kwargs)


class STTSKeyBiasAttention(BaseLayerWrapper):
    """The self-attention of block prune_layer + 1: applies the soft key bias when its block passes one.

    The bias arrives as a keyword argument of the call (not through the pass), so a gradient-checkpointed block
    recomputes exactly the same thing in the backward pass.
    """

    def __init__(self, base_layer: nn.Module, attention_with_key_bias: Callable[..., Any]) -> None:
        super().__init__(base_layer)
        self.attention_with_key_bias = attention_with_key_bias

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        key_bias = kwargs.pop(KEY_BIAS_KWARG, None)
        if key_bias is None:
            return self.base_layer(*args, **kwargs)
        return self.attention_with_key_bias(self.base_layer, *args, key_bias=key_bias, **kwargs)


class STTSMaskedAttention(BaseLayerWrapper):
    """The self-attention of a ViT block that takes no mask itself: inside a pruning pass it receives the mask the
    pass prepared for the running block (the key bias, then the packed rows' block-diagonal mask)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        vision_pass = active_pass()
        if vision_pass is not None and vision_pass.attention_mask is not None:
            kwargs = {**kwargs, "attention_mask": vision_pass.attention_mask}
        return self.base_layer(*args, **kwargs)


class STTSConnector(BaseLayerWrapper):
    """The connector (e.g. Qwen's patch merger): inside a pruning pass it runs on kept units only."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        vision_pass = active_pass()
        if vision_pass is None:
            return self.base_layer(*args, **kwargs)
        return vision_pass.run_connector(self.base_layer, args, kwargs)
