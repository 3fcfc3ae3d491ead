"""The `stts-adapter` parser and entry point."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

from .. import __version__
from ..errors import AdapterLoadError, STTSConfigError, STTSInputError, UnsupportedModelError
from .bench import run_bench
from .common import (
    MAX_DEFAULT_SIDE,
    PROG,
    SYNTHETIC,
    CLIError,
    positive_argument,
    progress_bars,
    ratio_argument,
)
from .convert import run_convert_molmo2
from .inspect import adapter_summary, run_inspect
from .visualize import run_visualize


def build_parser() -> argparse.ArgumentParser:
    """The `stts-adapter` argument parser (one sub-command per task)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Inspect STTS adapters, benchmark STTS on a model, and show which video units it keeps.",
        epilog="Models and adapters are local folders or Hub repo ids (HF_ENDPOINT, HF_TOKEN, HF_HUB_OFFLINE apply).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect", help="config, base model and sizes of an adapter", description=adapter_summary.__doc__
    )
    inspect.add_argument("adapter", metavar="ADAPTER", help="adapter folder or Hub repo id")
    inspect.add_argument("--revision", help="branch, tag or commit of a Hub adapter")
    inspect.add_argument("--json", action="store_true", help="print the summary as JSON")
    inspect.set_defaults(run=run_inspect)

    model_options = argparse.ArgumentParser(add_help=False)
    model_options.add_argument("--model", required=True, help="base model folder or Hub repo id")
    model_options.add_argument("--revision", help="branch, tag or commit of a Hub model")
    model_options.add_argument("--adapter", help="STTS adapter folder or Hub repo id (default: a fresh STTS config)")
    model_options.add_argument("--adapter-revision", help="branch, tag or commit of a Hub adapter")
    model_options.add_argument(
        "--method", choices=("scorer", "random", "similarity"), help="without --adapter: the pruning method"
    )
    model_options.add_argument(
        "--prune-layer", type=int, help="without --adapter: ViT block scored (default 3, or the deepest allowed)"
    )
    model_options.add_argument(
        "--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="model dtype (default float32)"
    )
    model_options.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if available, else cpu"
    )
    model_options.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    model_options.add_argument("--no-progress", action="store_true", help="no progress bars or notes on stderr")

    bench = commands.add_parser(
        "bench",
        parents=[model_options],
        help="speed with and without STTS on a model and a synthetic video",
        description="Time the model's forward (and with --train a training step) on a synthetic video, with STTS "
        "and without (STTS disabled), alternated, and print a table of medians.",
    )
    bench.add_argument("--frames", type=positive_argument, nargs="+", default=[8, 16, 32], help="frame counts")
    bench.add_argument("--ratios", type=ratio_argument, nargs="+", help="prune ratios (default 0.5, or the adapter's)")
    bench.add_argument(
        "--size", type=positive_argument, default=224, help="synthetic frame side in pixels (default 224)"
    )
    bench.add_argument("--repeats", type=positive_argument, default=3, help="timed runs per variant (default 3)")
    bench.add_argument("--train", action="store_true", help="also time a training step (every parameter trained)")
    bench.set_defaults(run=run_bench, method="scorer")

    visualize = commands.add_parser(
        "visualize",
        parents=[model_options],
        help="frames of a video with the units STTS keeps highlighted",
        description="Run the model with STTS on a video and draw its frames: kept units as they are, pruned units "
        "in grey, as a PNG contact sheet and optionally an animation. The batch is built by the checkpoint's own "
        "processor when it ships one. Needs Pillow.",
    )
    visualize.add_argument(
        "--video",
        default=SYNTHETIC,
        help="'synthetic', a video file (.mp4, .mov, ...; needs torchcodec or PyAV), a folder of frame images, an "
        "animated GIF, or a .npy / .pt / .safetensors tensor",
    )
    visualize.add_argument(
        "--frames",
        type=positive_argument,
        help="synthetic: frame count (default 8); files: keep this many, evenly spaced",
    )
    visualize.add_argument(
        "--size",
        type=positive_argument,
        help="longer frame side to resize to, for families that take any size such as Qwen (default: the video's "
        f"own, at most {MAX_DEFAULT_SIDE}; 224 if synthetic); the others always use the model's input size",
    )
    visualize.add_argument(
        "--prune-ratio", type=ratio_argument, help="fraction of units to prune (default: the adapter's)"
    )
    visualize.add_argument("--columns", type=positive_argument, help="frames per row of the picture (default up to 8)")
    visualize.add_argument("--out", default="kept.png", help="PNG to write (default kept.png)")
    visualize.add_argument(
        "--animation", metavar="FILE", help="also write the frames over time as an animated .gif or an .mp4 (PyAV)"
    )
    visualize.add_argument("--fps", type=float, default=4.0, help="frames per second of --animation (default 4)")
    visualize.set_defaults(run=run_visualize, method="scorer")

    convert = commands.add_parser(
        "convert-molmo2",
        help="import the STTS scorer of an official Molmo2 checkpoint as an adapter",
        description="Read the scorer (vision_backbone.image_vit.transformer.temporal_token_scorer) of an official "
        "Molmo2 checkpoint and write it as an STTS adapter folder for Molmo2ForConditionalGeneration.",
    )
    convert.add_argument("checkpoint", metavar="CHECKPOINT", help="a .safetensors file or a folder of them")
    convert.add_argument("out", metavar="OUT", help="adapter folder to write")
    convert.add_argument("--prune-layer", type=int, default=3, help="ViT block the scorer reads (default 3)")
    convert.add_argument("--prune-ratio", type=ratio_argument, default=0.5, help="default prune ratio (default 0.5)")
    convert.add_argument(
        "--num-heads", type=positive_argument, help="pooler query heads (grouped-query attention only)"
    )
    convert.add_argument(
        "--num-vision-blocks", type=positive_argument, help="ViT depth, if the checkpoint holds no block"
    )
    convert.add_argument("--base-model", help="Hub id of the HF Molmo2 model to record, e.g. allenai/Molmo2-4B")
    convert.set_defaults(run=run_convert_molmo2)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run `stts-adapter` with `argv` (default: `sys.argv[1:]`).

    Args:
        argv (`Sequence[str]`, *optional*): the arguments after the program name.

    Returns:
        `int`: the exit status (0 on success, 1 on an error, 2 on a usage error).
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("bench", "visualize") and args.adapter:
        if args.method != "scorer":
            parser.error("--method applies without --adapter (an adapter brings its own method)")
        if args.prune_layer is not None:
            parser.error("--prune-layer applies without --adapter (an adapter brings its own prune layer)")
    try:
        with progress_bars(enabled=not getattr(args, "no_progress", False)):
            return args.run(args)
    except (
        CLIError,
        AdapterLoadError,
        STTSConfigError,
        STTSInputError,
        UnsupportedModelError,
        ImportError,
        OSError,
    ) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1
