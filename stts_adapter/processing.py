"""`prepare_inputs`: run a model's transformers processor and add what STTS needs to find the videos in its output.

Most processors give videos inputs of their own (`pixel_values_videos`, video grids, token type ids), and their
output goes to an STTS model unchanged. A few (SmolVLM2, InternVL) put video frames and still images into the same
`pixel_values` and write frames with the image placeholder token, so nothing in their output says which rows are
frames; the processor call knows it, and this helper keeps it.
"""

from __future__ import annotations

import os
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
        images, videos: as the processor takes them; videos may also be paths of video files, decoded here with the
            transformers video loader (torchcodec when it is usable, else PyAV: `pip install "stts-adapter[video]"`)
            and passed with their metadata (frame rate, timestamps), as the processors decode them themselves.
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
    if videos is not None and "video_metadata" not in processor_kwargs:
        videos, metadata = decode_video_files(videos)
        if metadata is not None:
            processor_kwargs["video_metadata"] = metadata
    inputs = processor(text=texts, images=images, videos=videos, **processor_kwargs)
    return _entry_of(model).mark_videos(processor, inputs, texts, images is not None, videos is not None)


def _entry_of(model: nn.Module) -> ArchitectureEntry:
    architecture = getattr(model, "architecture", None)  # an STTSModel
    if isinstance(architecture, ArchitectureEntry):
        return architecture
    return find_architecture(unwrap_peft(model))


VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def decode_video_files(videos: Any) -> tuple[Any, list[Any] | None]:
    """Decode the video files among `videos` (paths) into frames with the transformers video loader.

    A processor decodes paths itself, but only with torchcodec; this falls back to PyAV, so a video file works
    wherever one of the two is installed.

    Args:
        videos: a path, or a list of paths and already decoded videos.

    Returns:
        `(videos, metadata)`: the decoded videos (`(frames, height, width, 3)` uint8 arrays, decoded ones passed
        through) and their `VideoMetadata` (None when nothing was decoded here).

    Raises:
        ImportError: if no video decoder is installed, saying which to install.
    """
    single = isinstance(videos, (str, os.PathLike))
    items = [videos] if single else list(videos)
    if not any(_is_video_file(item) for item in items):
        return videos, None
    from transformers.video_utils import is_av_available, is_torchcodec_available, load_video

    if is_torchcodec_available():
        backend = "torchcodec"
    elif is_av_available():
        backend = "pyav"
    else:
        raise ImportError('Decoding video files needs torchcodec or PyAV: pip install "stts-adapter[video]" (PyAV).')
    decoded, metadata = [], []
    for item in items:
        if _is_video_file(item):
            frames, info = load_video(os.fspath(item), backend=backend)
        else:
            frames, info = item, None
        decoded.append(frames)
        metadata.append(info)
    if any(info is None for info in metadata):
        return decoded, None  # a processor takes metadata for every video or for none
    return (decoded[0] if single else decoded), (metadata[0] if single else metadata)


def _is_video_file(item: Any) -> bool:
    return isinstance(item, (str, os.PathLike)) and os.fspath(item).lower().endswith(VIDEO_SUFFIXES)


def write_video_file(path: str | os.PathLike, frames: Any, fps: float = 4) -> None:
    """Write frames as an H.264 mp4 file with PyAV (`pip install "stts-adapter[video]"`).

    Args:
        path (`str` or `os.PathLike`): the file to write.
        frames (`numpy.ndarray` of shape `(frames, height, width, 3)`): uint8 RGB, even height and width.
        fps (`float`): frames per second.
    """
    try:
        import av
    except ImportError as exc:
        raise ImportError('Writing an mp4 file needs PyAV: pip install "stts-adapter[video]" (or av).') from exc
    from fractions import Fraction

    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width, stream.pix_fmt = frames.shape[1], frames.shape[2], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
