"""`prepare_inputs`: run a model's transformers processor and add what STTS needs to find the videos in its output.

Most processors give videos inputs of their own (`pixel_values_videos`, video grids, token type ids), and their
output goes to an STTS model unchanged. A few (SmolVLM2, InternVL) put video frames and still images into the same
`pixel_values` and write frames with the image placeholder token, so nothing in their output says which rows are
frames; the processor call knows it, and this helper keeps it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .registry import ArchitectureEntry, find_architecture, unwrap_peft


def prepare_inputs(
    processor: Any,
    model: nn.Module,
    text: str | list[str],
    images: Any = None,
    videos: Any = None,
    **processor_kwargs: Any,
) -> Any:
    """`processor(text=text, images=images, videos=videos, **processor_kwargs)`, plus the keywords the model's family
    needs to tell its video frames from still images (none for most families).

    Args:
        processor: the model's transformers processor (e.g. `AutoProcessor.from_pretrained(model_id)`).
        model (`nn.Module`): the STTS model, or the base model it wraps (a transformers VLM or a PEFT model of one).
        text (`str` or `list[str]`): the prompts, with the processor's image and video tokens.
        images, videos: as the processor takes them.
        **processor_kwargs: passed to the processor (`return_tensors="pt"`, `padding=True`, ...).

    Returns:
        The processor's output (a `BatchFeature`), with the family's video keywords added; pass it to the model as
        `model(**inputs)` or `model.generate(**inputs)`.

    Example:

        ```python
        >>> inputs = prepare_inputs(processor, stts_model, text=["<video> What happens?"], videos=[frames],
        ...                         return_tensors="pt")
        >>> out = stts_model(**inputs)
        ```
    """
    texts = [text] if isinstance(text, str) else list(text)
    inputs = processor(text=texts, images=images, videos=videos, **processor_kwargs)
    return _entry_of(model).mark_videos(processor, inputs, texts, images is not None, videos is not None)


def _entry_of(model: nn.Module) -> ArchitectureEntry:
    architecture = getattr(model, "architecture", None)  # an STTSModel
    if isinstance(architecture, ArchitectureEntry):
        return architecture
    return find_architecture(unwrap_peft(model))
