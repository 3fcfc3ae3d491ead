"""Pictures of the units a model keeps on test clips (`kept_units.png`, `kept_units_distractor.png`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from benchmarks.video_qa.data import ANSWERS, CELL, QUESTION_TYPES, SLOT, Clip
from benchmarks.video_qa.evaluate import predict
from benchmarks.video_qa.rows import Row
from stts_adapter.visualization import kept_pixels, render_kept_units


def draw_kept_units(model: torch.nn.Module, clips: Sequence[Clip], row: Row, path: str) -> None:
    """Frames of test clips with the units `model` pruned in grey (stts_adapter.visualization), stacked."""
    from PIL import Image

    model.eval()
    sheets = []
    for clip in clips:
        mask = predict(model, [clip], row).keep_masks[0]
        frames = clip.video
        grid = (frames.shape[-2] // CELL, frames.shape[-1] // CELL)
        keep = kept_pixels(mask, grid, *frames.shape[:1], *frames.shape[-2:])
        slot_of_frame = [t // SLOT for t in range(frames.shape[0])]
        question = QUESTION_TYPES[clip.question]
        captions = [f"#{t} kept {int(mask[s].sum())}/{mask.shape[1]}" for t, s in enumerate(slot_of_frame)]
        captions[0] = f"{question}: {ANSWERS[question][clip.answer]}"
        sheets.append(render_kept_units(frames, keep, captions, columns=8)[0])
    canvas = Image.new("RGB", (max(s.width for s in sheets), sum(s.height for s in sheets)), (255, 255, 255))
    top = 0
    for sheet in sheets:
        canvas.paste(sheet, (0, top))
        top += sheet.height
    canvas.save(path)


def picture_clips(clips: Sequence[Clip]) -> list[Clip]:
    """The first test clip of the direction and of the count question (things move and flash there)."""
    return [next(c for c in clips if c.question == QUESTION_TYPES.index(q)) for q in ("direction", "count")]
