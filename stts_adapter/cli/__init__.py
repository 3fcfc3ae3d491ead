"""`stts-adapter`: the command line, for what people do without writing Python.

    stts-adapter inspect ADAPTER [--revision REV] [--json]
    stts-adapter bench --model PATH_OR_ID [--adapter ADAPTER] [--frames 8 16 32] [--ratios 0.5] [--train]
    stts-adapter visualize --model PATH_OR_ID [--adapter ADAPTER | --method similarity] [--video FILE_OR_SYNTHETIC]
                           [--out kept.png] [--animation kept.gif]
    stts-adapter convert-molmo2 CHECKPOINT OUT

`ADAPTER` and `--model` take a local folder or a Hub repo id (with `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE`
as huggingface_hub reads them). Results go to stdout, progress bars and notes to stderr; errors exit with status 1
(usage errors with 2). One module per command; `video` turns a model id and a video into a batch: with the
checkpoint's own processor when it ships one, else with the family's layout builder (which inputs a model family
takes is decided in one place, `VIDEO_FAMILIES`). The drawing lives in `stts_adapter.visualization`, shared with the
benchmarks.
"""

from ..visualization import PRUNED_GREY, kept_pixels, render_kept_units, shown_pixels, write_kept_animation
from .inspect import adapter_summary, format_summary
from .main import build_parser, main
from .video import (
    VIDEO_FAMILIES,
    VideoFamily,
    VideoInputs,
    build_video_batch,
    load_base_model,
    load_processor,
    load_video,
    prepare_video,
    processor_normalization,
    video_inputs,
)

__all__ = [
    "PRUNED_GREY",
    "VIDEO_FAMILIES",
    "VideoFamily",
    "VideoInputs",
    "adapter_summary",
    "build_parser",
    "build_video_batch",
    "format_summary",
    "kept_pixels",
    "load_base_model",
    "load_processor",
    "load_video",
    "main",
    "prepare_video",
    "processor_normalization",
    "render_kept_units",
    "shown_pixels",
    "video_inputs",
    "write_kept_animation",
]
