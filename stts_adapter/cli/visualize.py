"""`stts-adapter visualize`: a video's frames with the units STTS keeps highlighted."""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

import torch

from ..visualization import LEGEND, kept_pixels, pillow, render_kept_units, write_kept_animation
from .common import MAX_DEFAULT_SIDE, CLIError
from .video import (
    VideoFamily,
    input_preparation,
    load_base_model,
    load_video,
    unit_side,
    video_family,
    video_inputs,
    wrap_model,
)


def unit_grid(
    family: VideoFamily,
    config: Any,
    height: int,
    width: int,
    units_per_frame: int,
    rows_columns: tuple[int, int] | None = None,
) -> tuple[int, int]:
    """(rows, columns) of units over a `height` x `width` frame, row-major as the placeholders are ordered
    (`rows_columns` when the processor's output gives it)."""
    if rows_columns is not None:
        rows, columns = rows_columns
    elif family.frames == "grid":
        side = unit_side(config)
        rows, columns = height // side, width // side
    else:
        rows = columns = math.isqrt(units_per_frame)
    if rows * columns != units_per_frame:
        raise CLIError(
            f"Cannot lay {units_per_frame} units per frame out on a grid over {height}x{width} frames "
            f"({rows}x{columns})."
        )
    return rows, columns


def run_visualize(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if not args.adapter and args.method == "scorer":
        raise CLIError(
            "Without --adapter there is no trained scorer to show (a fresh one prunes arbitrarily): pass "
            "--adapter PATH_OR_REPO_ID, or --method similarity / random for a training-free baseline."
        )
    pillow()  # fail before the slow steps if Pillow is missing
    steps = ["load model", "read video", "prune", "draw"]
    with tqdm(total=len(steps), desc=steps[0], unit="step", disable=args.no_progress or None) as bar:
        model = load_base_model(args.model, args.revision, args.dtype, args.device)
        name, family = video_family(model)
        stts = wrap_model(model, args, prune_ratio=args.prune_ratio)
        bar.update()
        bar.set_description(steps[1])
        processor, normalization = input_preparation(args.model, args.revision)
        video = load_video(args.video, args.frames, args.size or 224)
        size = args.size if args.size or max(video.shape[-2:]) <= MAX_DEFAULT_SIDE else MAX_DEFAULT_SIDE
        inputs = video_inputs(model, family, video, size, processor, normalization, model_name=args.model)
        bar.update()
        bar.set_description(steps[2])
        with torch.no_grad():
            report = stts(**inputs.batch).stts
        if report is None:
            raise CLIError(f"STTS pruned nothing of this video (batch {inputs.source}); see the warnings above.")
        bar.update()
        bar.set_description(steps[3])
        frames, keep_mask = inputs.frames, report.keep_masks[0].cpu()
        count, _, height, width = frames.shape
        grid = unit_grid(family, model.config, height, width, keep_mask.shape[1], inputs.unit_rows_columns)
        keep = kept_pixels(keep_mask, grid, count, height, width)
        slot_of_frame = (torch.arange(count) * keep_mask.shape[0] // count).tolist()
        per_slot = keep_mask.sum(1).tolist()
        units = keep_mask.shape[1]
        captions = [
            f"#{index} kept {per_slot[slot]}/{units} ({per_slot[slot] / units:.0%})"
            for index, slot in enumerate(slot_of_frame)
        ]
        sheet, _ = render_kept_units(frames, keep, captions, columns=args.columns)
        for path in (args.out, args.animation):
            if path:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        sheet.save(args.out)
        if args.animation:
            write_kept_animation(args.animation, frames, keep, captions, fps=args.fps)
        bar.update()
    kept, total = report.units_after[0], report.units_before[0]
    c = stts.stts_config
    print(
        f"{c.base_model_class} ({name}), {c.method} at prune_ratio {c.prune_ratio}, prune_layer {c.prune_layer}: "
        f"kept {kept} of {total} units ({kept / total:.0%}) of a {count}-frame {height}x{width} video."
    )
    slots = keep_mask.shape[0]
    frames_per_slot = "frame" if slots == count else f"temporal slot ({math.ceil(count / slots)} frames)"
    print(f"Kept units per {frames_per_slot}: {per_slot} of {keep_mask.shape[1]}.")
    print(f"Batch {inputs.source}.")
    print(f"Wrote {args.out}" + (f" and {args.animation}" if args.animation else "") + f": {LEGEND}.")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(
                {
                    "family": name,
                    "video": args.video,
                    "frames": count,
                    "frame_size": [height, width],
                    "unit_grid": list(grid),
                    "slot_of_frame": slot_of_frame,
                    "keep_masks": keep_mask.reshape(slots, *grid).int().tolist(),
                    "units_before": total,
                    "units_after": kept,
                    "batch": inputs.source,
                },
                f,
            )
    return 0
