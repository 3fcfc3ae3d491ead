"""Drawing which video units STTS kept: frames with the pruned units dimmed (used by the CLI and the benchmarks)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

PRUNED_BRIGHTNESS = 0.25
"""Pruned units are drawn at this fraction of their brightness; kept units are drawn unchanged."""


def pillow() -> tuple:
    """Pillow's `Image`, `ImageDraw`, `ImageFont` and `ImageSequence` modules (an optional dependency).

    Raises:
        ImportError: saying how to install it.
    """
    try:
        from PIL import Image, ImageDraw, ImageFont, ImageSequence
    except ImportError as exc:
        raise ImportError(
            "Reading image frames and writing PNGs needs Pillow: pip install 'stts-adapter[cli]' (or pillow)."
        ) from exc
    return Image, ImageDraw, ImageFont, ImageSequence


def kept_pixels(keep_mask: torch.Tensor, grid: tuple[int, int], frames: int, height: int, width: int) -> torch.Tensor:
    """Which pixels of every frame belong to kept units.

    Args:
        keep_mask (`torch.Tensor` of shape `(slots, units_per_slot)`): a video's `out.stts.keep_masks` entry; a slot
            is one frame, or several (Qwen: 2 frames per temporal slot).
        grid (`tuple[int, int]`): `(rows, columns)` of units per slot.
        frames, height, width (`int`): the video's size.

    Returns:
        `torch.Tensor` of shape `(frames, height, width)`, bool.
    """
    slots = keep_mask.shape[0]
    cells = keep_mask.reshape(slots, 1, *grid).float()
    per_slot = F.interpolate(cells, size=(height, width), mode="nearest")[:, 0] > 0.5
    slot_of_frame = torch.arange(frames) * slots // frames
    return per_slot[slot_of_frame]


def render_kept_units(
    frames: torch.Tensor, keep: torch.Tensor, captions: Sequence[str], columns: int | None = None, min_side: int = 160
):
    """A contact sheet of the frames: kept units as they are, pruned units dimmed, a caption under each frame.

    Args:
        frames (`torch.Tensor` of shape `(frames, 3, height, width)`): in [0, 1].
        keep (`torch.Tensor` of shape `(frames, height, width)`): from `kept_pixels`.
        captions (`Sequence[str]`): one per frame.
        columns (`int`, *optional*): frames per row (default: up to 8).
        min_side (`int`): small frames are scaled up (nearest neighbour, integer factor) to at least this size.

    Returns:
        `(PIL.Image.Image, boxes)`: the sheet and every frame's `(left, top, right, bottom)` box in it.
    """
    Image, ImageDraw, ImageFont, _ = pillow()
    count, _, height, width = frames.shape
    scale = max(1, math.ceil(min_side / max(height, width)))
    shown = frames * torch.where(keep, 1.0, PRUNED_BRIGHTNESS)[:, None]
    shown = shown.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    tiles = (shown * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    columns = columns or min(count, 8)
    rows = math.ceil(count / columns)
    margin, caption_height = 6, 16
    tile_w, tile_h = width * scale, height * scale
    sheet = Image.new(
        "RGB",
        (margin + columns * (tile_w + margin), margin + rows * (tile_h + caption_height + margin)),
        (255, 255, 255),
    )
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    boxes = []
    for index in range(count):
        left = margin + (index % columns) * (tile_w + margin)
        top = margin + (index // columns) * (tile_h + caption_height + margin)
        sheet.paste(Image.fromarray(tiles[index]), (left, top))
        draw.text((left, top + tile_h + 2), captions[index], fill=(0, 0, 0), font=font)
        boxes.append((left, top, left + tile_w, top + tile_h))
    return sheet, boxes
