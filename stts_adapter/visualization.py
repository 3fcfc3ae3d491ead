"""Drawing which video units STTS kept: frames with the pruned units washed out to grey, as a contact sheet (PNG) or
an animation (GIF, MP4). Used by the CLI and the benchmarks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

PRUNED_GREY = (0.45, 0.35)
"""Pruned units are drawn in grey, `offset + scale * luminance`: still readable, never black; kept units unchanged."""
LEGEND = "kept units as they are, pruned units in grey"


def shown_pixels(frames: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The frames as drawn: kept pixels unchanged, pruned ones washed out to grey.

    Args:
        frames (`torch.Tensor` of shape `(frames, 3, height, width)`): in [0, 1].
        keep (`torch.Tensor` of shape `(frames, height, width)`): from `kept_pixels`.

    Returns:
        `torch.Tensor` of the shape of `frames`, in [0, 1].
    """
    luminance = (frames * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(1, keepdim=True)
    offset, scale = PRUNED_GREY
    return torch.where(keep[:, None], frames, (offset + scale * luminance).expand_as(frames))


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
    """A contact sheet of the frames: kept units as they are, pruned units in grey, a caption under each frame and a
    legend line at the bottom.

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
    tiles = _uint8_tiles(shown_pixels(frames, keep), scale)
    columns = columns or min(count, 8)
    rows = math.ceil(count / columns)
    margin, caption_height = 6, 16
    tile_w, tile_h = width * scale, height * scale
    sheet = Image.new(
        "RGB",
        (margin + columns * (tile_w + margin), margin + rows * (tile_h + caption_height + margin) + caption_height),
        (255, 255, 255),
    )
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default()
    draw.text((margin, sheet.height - caption_height), LEGEND, fill=(0, 0, 0), font=font)
    boxes = []
    for index in range(count):
        left = margin + (index % columns) * (tile_w + margin)
        top = margin + (index // columns) * (tile_h + caption_height + margin)
        sheet.paste(Image.fromarray(tiles[index]), (left, top))
        draw.text((left, top + tile_h + 2), captions[index], fill=(0, 0, 0), font=font)
        boxes.append((left, top, left + tile_w, top + tile_h))
    return sheet, boxes


def write_kept_animation(
    path: str, frames: torch.Tensor, keep: torch.Tensor, captions: Sequence[str], fps: float = 4.0, min_side: int = 160
) -> None:
    """An animation of the frames over time, drawn as `render_kept_units` draws them, each frame captioned.

    Args:
        path (`str`): a `.gif` (Pillow) or `.mp4` (H.264 with PyAV: `pip install "stts-adapter[video]"`) file.
        frames, keep, captions: as for `render_kept_units`.
        fps (`float`): frames per second.
        min_side (`int`): small frames are scaled up (nearest neighbour, integer factor) to at least this size.

    Raises:
        ValueError: for another suffix.
    """
    Image, ImageDraw, ImageFont, _ = pillow()
    height, width = frames.shape[-2:]
    scale = max(1, math.ceil(min_side / max(height, width)))
    caption_height = 16
    font = ImageFont.load_default()
    pictures = []
    for index, tile in enumerate(_uint8_tiles(shown_pixels(frames, keep), scale)):
        picture = Image.new("RGB", (tile.shape[1], tile.shape[0] + 2 * caption_height), (255, 255, 255))
        picture.paste(Image.fromarray(tile), (0, 0))
        draw = ImageDraw.Draw(picture)
        draw.text((2, tile.shape[0] + 1), captions[index], fill=(0, 0, 0), font=font)
        draw.text((2, tile.shape[0] + caption_height), "grey: pruned", fill=(90, 90, 90), font=font)
        pictures.append(picture)
    suffix = path.lower().rsplit(".", 1)[-1]
    if suffix == "gif":
        pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=round(1000 / fps), loop=0)
    elif suffix == "mp4":
        import numpy as np

        from .processing import write_video_file

        even = [np.asarray(p)[: p.height // 2 * 2, : p.width // 2 * 2] for p in pictures]  # H.264 wants even sides
        write_video_file(path, np.stack(even), fps=fps)
    else:
        raise ValueError(f"Cannot write an animation to {path!r}: use a .gif or .mp4 file.")


def _uint8_tiles(shown: torch.Tensor, scale: int):
    """`(frames, height * scale, width * scale, 3)` uint8 numpy pixels of frames in [0, 1]."""
    shown = shown.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    return (shown * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
