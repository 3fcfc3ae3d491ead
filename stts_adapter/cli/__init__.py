"""`stts-adapter`: the command line, for what people do without writing Python.

    stts-adapter inspect ADAPTER [--revision REV] [--json]
    stts-adapter bench --model PATH_OR_ID [--adapter ADAPTER] [--frames 8 16 32] [--ratios 0.5] [--train]
    stts-adapter visualize --model PATH_OR_ID [--adapter ADAPTER | --method similarity] [--video FILE_OR_SYNTHETIC]
                           [--out kept.png]
    stts-adapter convert-molmo2 CHECKPOINT OUT

`ADAPTER` and `--model` take a local folder or a Hub repo id (with `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE`
as huggingface_hub reads them). Results go to stdout, progress bars and notes to stderr; errors exit with status 1
(usage errors with 2). One module per command; `video` turns a model id and a video into a batch (which inputs a
model family takes is decided in one place, `VIDEO_FAMILIES`), and the drawing lives in
`stts_adapter.visualization`, shared with the benchmarks.
"""

from ..visualization import PRUNED_BRIGHTNESS, kept_pixels, render_kept_units
from .inspect import adapter_summary, format_summary
from .main import build_parser, main
from .video import (
    VIDEO_FAMILIES,
    VideoFamily,
    build_video_batch,
    load_base_model,
    load_video,
    prepare_video,
    processor_normalization,
)

__all__ = [
    "PRUNED_BRIGHTNESS",
    "VIDEO_FAMILIES",
    "VideoFamily",
    "adapter_summary",
    "build_parser",
    "build_video_batch",
    "format_summary",
    "kept_pixels",
    "load_base_model",
    "load_video",
    "main",
    "prepare_video",
    "processor_normalization",
    "render_kept_units",
]
