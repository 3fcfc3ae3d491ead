"""`AutoSTTSModel`: load an adapter by its id alone, with the base model it names (as PEFT's `AutoPeftModel`)."""

from __future__ import annotations

import os
from typing import Any

from .config import STTSConfig
from .errors import AdapterLoadError
from .model import STTSModel
from .registry import get_architecture


class AutoSTTSModel:
    """Loads the base model recorded in an adapter's `stts_config.json`, then the adapter onto it.

    Example:

        ```python
        >>> from stts_adapter import AutoSTTSModel
        >>> model = AutoSTTSModel.from_pretrained("you/qwen2.5-vl-3b-stts", dtype=torch.bfloat16, device_map="auto")
        ```
    """

    @classmethod
    def from_pretrained(
        cls,
        adapter_name_or_path: str | os.PathLike,
        revision: str | None = None,
        token: str | bool | None = None,
        is_trainable: bool = False,
        base_model_revision: str | None = None,
        **base_model_kwargs: Any,
    ) -> STTSModel:
        """Load the adapter's base model with the class its family uses (the transformers class it was saved with,
        `timm.create_model` for timm), then the adapter.

        Args:
            adapter_name_or_path (`str`): a folder written by `save_pretrained`, or a Hub repo id.
            revision (`str`, *optional*): the adapter's branch, tag or commit.
            token (`str` or `bool`, *optional*): Hub token, for the adapter and the base model.
            is_trainable (`bool`): False (default) loads for inference.
            base_model_revision (`str`, *optional*): the base model's revision.
            **base_model_kwargs: passed to the base model's loader (`dtype`, `device_map`, ...).

        Returns:
            `STTSModel`

        Raises:
            AdapterLoadError: if the adapter records no base model to load.
        """
        config = STTSConfig.from_pretrained(adapter_name_or_path, revision=revision, token=token)
        if not config.base_model_name_or_path or not config.architecture:
            raise AdapterLoadError(
                f"The STTS adapter {os.fspath(adapter_name_or_path)!r} does not record its base model "
                f"(base_model_name_or_path={config.base_model_name_or_path!r}, architecture={config.architecture!r}): "
                "load the base model yourself and call STTSModel.from_pretrained(base_model, adapter)."
            )
        if base_model_revision is not None:
            base_model_kwargs["revision"] = base_model_revision
        if token is not None:
            base_model_kwargs.setdefault("token", token)
        entry = get_architecture(config.architecture)
        base = entry.load_base_model(config.base_model_name_or_path, config.base_model_class, **base_model_kwargs)
        return STTSModel.from_pretrained(
            base, adapter_name_or_path, revision=revision, token=token, is_trainable=is_trainable
        )
