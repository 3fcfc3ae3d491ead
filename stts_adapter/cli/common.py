"""What every command shares: constants, the error it reports, argument types, progress output."""

from __future__ import annotations

import argparse
import contextlib
import sys

PROG = "stts-adapter"
SYNTHETIC = "synthetic"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
MAX_DEFAULT_SIDE = 448
"""`visualize` scales larger videos down to this longer side unless `--size` is given."""


class CLIError(Exception):
    """A problem with the command's inputs, reported as `stts-adapter <command>: error: ...` (exit status 1)."""


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """Switch transformers' and huggingface_hub's own progress bars off (loading, downloads) for `--no-progress`,
    and back to how they were afterwards."""
    if enabled:
        yield
        return
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as transformers_logging

    hub_was_on = not hub_utils.are_progress_bars_disabled()
    transformers_was_on = transformers_logging.is_progress_bar_enabled()
    hub_utils.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if hub_was_on:
            hub_utils.enable_progress_bars()
        if transformers_was_on:
            transformers_logging.enable_progress_bar()


def note(args: argparse.Namespace, message: str) -> None:
    if not args.no_progress:
        print(message, file=sys.stderr)


def ratio_argument(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a prune ratio (0 <= ratio < 1)")
    return value


def positive_argument(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value
