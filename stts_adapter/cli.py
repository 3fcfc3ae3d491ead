"""`stts-adapter`: the command line, for what people do without writing Python.

    stts-adapter inspect ADAPTER [--revision REV] [--json]
    stts-adapter bench --model PATH_OR_ID [--adapter ADAPTER] [--frames 8 16 32] [--ratios 0.5] [--train]
    stts-adapter visualize --model PATH_OR_ID [--adapter ADAPTER | --method similarity] [--video FILE_OR_SYNTHETIC]
                           [--out kept.png]

`ADAPTER` and `--model` take a local folder or a Hub repo id (with `HF_ENDPOINT`, `HF_TOKEN` and `HF_HUB_OFFLINE`
as huggingface_hub reads them). Results go to stdout, progress bars and notes to stderr; errors exit with status 1
(usage errors with 2).

Which inputs a model family takes is decided in one place, `VIDEO_FAMILIES`: every family maps to the
processor-faithful batch builder of `stts_adapter.testing` and to how its processor sizes frames.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from . import __version__
from .config import CONFIG_NAME, STTSConfig
from .errors import AdapterLoadError, STTSConfigError, STTSInputError, UnsupportedModelError

PROG = "stts-adapter"
SYNTHETIC = "synthetic"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
MAX_DEFAULT_SIDE = 448
"""`visualize` scales larger videos down to this longer side unless `--size` is given."""
PRUNED_BRIGHTNESS = 0.25
"""Pruned units are drawn at this fraction of their brightness; kept units are drawn unchanged."""


class CLIError(Exception):
    """A problem with the command's inputs, reported as `stts-adapter <command>: error: ...` (exit status 1)."""


# ----------------------------------------------------------------------------------------------- model families
@dataclass(frozen=True)
class VideoFamily:
    """How the command line builds a video batch for one registered model family.

    Args:
        case (`str`): `"module:NAME"` of the family's `stts_adapter.testing.FamilyCase`, whose `build_batch` lays out
            tokens and pixels exactly as the family's processor does and whose `units` counts the units it makes.
        frames (`str`): how the processor sizes frames: `"grid"` (any size, each side a multiple of the unit's side
            in pixels, e.g. 28 px for Qwen2.5-VL) or `"square"` (resized to the vision config's `image_size`).
        normalizes (`bool`): the batch builder normalises pixels itself (takes them in [0, 1]).
    """

    case: str
    frames: str
    normalizes: bool = False

    def load_case(self) -> Any:
        module, name = self.case.split(":")
        return getattr(importlib.import_module(module), name)


VIDEO_FAMILIES: dict[str, VideoFamily] = {
    "qwen2_5_vl": VideoFamily("stts_adapter.testing.qwen:QWEN2_5_VL", "grid"),
    "qwen2_vl": VideoFamily("stts_adapter.testing.qwen:QWEN2_VL", "grid"),
    "qwen3_vl": VideoFamily("stts_adapter.testing.qwen3_vl:QWEN3_VL", "grid"),
    "glm4v": VideoFamily("stts_adapter.testing.glm4v:GLM4V", "grid"),
    "llava_onevision": VideoFamily("stts_adapter.testing.llava_onevision:LLAVA_ONEVISION", "square"),
    "llava_next_video": VideoFamily("stts_adapter.testing.llava_next_video:LLAVA_NEXT_VIDEO", "square"),
    "video_llava": VideoFamily("stts_adapter.testing.video_llava:VIDEO_LLAVA", "square"),
    "smolvlm": VideoFamily("stts_adapter.testing.smolvlm:SMOLVLM", "square"),
    "internvl": VideoFamily("stts_adapter.testing.internvl:INTERNVL", "square"),
    "molmo2": VideoFamily("stts_adapter.testing.molmo2:MOLMO2", "square", normalizes=True),
}


def video_family(model: torch.nn.Module) -> tuple[str, VideoFamily]:
    """The registry name and `VideoFamily` of `model`.

    Raises:
        CLIError: for a model the registry knows but the command line cannot build video batches for (a ViT alone,
            a plugin family).
    """
    from .registry import find_architecture, unwrap_peft

    entry = find_architecture(unwrap_peft(model))
    if entry.name not in VIDEO_FAMILIES:
        raise CLIError(
            f"The command line builds video batches for {', '.join(sorted(VIDEO_FAMILIES))}; "
            f"{type(model).__name__} is the registered family {entry.name!r}, for which it has no batch builder. "
            "Use the Python API with your processor's batches (see the README)."
        )
    return entry.name, VIDEO_FAMILIES[entry.name]


def frame_size(family: VideoFamily, config: Any, height: int, width: int, size: int | None) -> tuple[int, int]:
    """The (height, width) the family's processor gives frames of a `height` x `width` video.

    Args:
        family (`VideoFamily`): the model's family.
        config: the model config.
        height, width (`int`): the video's frame size.
        size (`int`, *optional*): for "grid" families, the longer side to scale to (None: keep the size); each side
            is then rounded to a multiple of the unit's side. "square" families ignore it.

    Returns:
        `tuple[int, int]`
    """
    vision = config.vision_config
    if family.frames == "square":
        side = vision.image_size
        side = side[0] if isinstance(side, (list, tuple)) else side
        return int(side), int(side)
    unit = unit_side(config)
    scale = 1.0 if size is None else size / max(height, width)
    return tuple(max(unit, round(side * scale / unit) * unit) for side in (height, width))


def unit_side(config: Any) -> int:
    """Pixels along one side of a unit of a "grid" family (patch size x spatial merge size)."""
    return int(config.vision_config.patch_size * config.vision_config.spatial_merge_size)


def prepare_video(
    video: torch.Tensor, family: VideoFamily, config: Any, size: int | None, normalization: Normalization | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize a video as the family's processor does and normalise it.

    Args:
        video (`torch.Tensor` of shape `(frames, 3, height, width)`): in [0, 1].
        family (`VideoFamily`): the model's family.
        config: the model config.
        size (`int`, *optional*): see `frame_size`.
        normalization (`Normalization`, *optional*): the processor's mean and std (None: pixels stay in [0, 1]).

    Returns:
        `(frames, pixels)`: the resized frames in [0, 1] (what a person sees) and the pixels the batch builder takes.
    """
    height, width = frame_size(family, config, video.shape[-2], video.shape[-1], size)
    if (height, width) != tuple(video.shape[-2:]):
        video = F.interpolate(video, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
        video = video.clamp(0, 1)
    pixels = video
    if normalization is not None and not family.normalizes:
        pixels = (video - normalization.mean[:, None, None]) / normalization.std[:, None, None]
    return video, pixels


def build_video_batch(model: torch.nn.Module, family: VideoFamily, pixels: torch.Tensor, labels: bool = False):
    """The family's processor-faithful batch of one sample holding `pixels`, on the model's device and dtype.

    Args:
        model: the base model.
        family (`VideoFamily`): its family.
        pixels (`torch.Tensor` of shape `(frames, 3, height, width)`): sized by `prepare_video`.
        labels (`bool`): add a two-token answer and its labels (for a training step).

    Returns:
        `dict`: the model's keyword arguments.
    """
    from .testing import Sample

    case = family.load_case()
    batch = case.build_batch(model.config, [Sample(video=pixels, answer=[5, 6] if labels else None)])
    device, dtype = model.device, model.dtype
    return {
        key: value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
        if isinstance(value, torch.Tensor)
        else value
        for key, value in batch.items()
    }


@dataclass
class Normalization:
    """A processor's pixel normalisation: `(pixels - mean) / std`, per channel."""

    mean: torch.Tensor
    std: torch.Tensor
    source: str


def processor_normalization(name_or_path: str, revision: str | None = None) -> Normalization | None:
    """The `image_mean` / `image_std` of the model's video (or image) processor config, if it ships one.

    Reads `video_preprocessor_config.json`, then `preprocessor_config.json`, from the folder or the Hub repo.

    Returns:
        `Normalization`, or None when the model has no processor config (pixels then stay in [0, 1]).
    """
    for filename in ("video_preprocessor_config.json", "preprocessor_config.json"):
        path = _model_file(name_or_path, filename, revision)
        if path is None:
            continue
        with open(path, encoding="utf-8") as f:
            values = json.load(f)
        mean, std = values.get("image_mean"), values.get("image_std")
        if mean is not None and std is not None:
            as_tensor = lambda v: torch.tensor([float(x) for x in (v if isinstance(v, list) else [v] * 3)])
            return Normalization(as_tensor(mean), as_tensor(std), filename)
    return None


def _model_file(name_or_path: str, filename: str, revision: str | None) -> str | None:
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        return path if os.path.isfile(path) else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return hf_hub_download(name_or_path, filename, revision=revision)
    except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError):
        return None


def load_base_model(
    name_or_path: str, revision: str | None = None, dtype: str = "float32", device: str = "cpu"
) -> torch.nn.Module:
    """Load a VLM by its config's `architectures` (falling back to `AutoModelForImageTextToText`), in eval mode.

    Args:
        name_or_path (`str`): a folder written by `save_pretrained` or a Hub repo id.
        revision (`str`, *optional*): branch, tag or commit on the Hub.
        dtype (`str`): "float32", "bfloat16" or "float16".
        device (`str`): e.g. "cpu" or "cuda".
    """
    import transformers
    from transformers import AutoConfig

    hub = {"revision": revision} if revision else {}  # not revision=None: transformers then skips resolving main
    config = AutoConfig.from_pretrained(name_or_path, **hub)
    classes = [getattr(transformers, name, None) for name in (config.architectures or [])]
    model_class = next((c for c in classes if c is not None), transformers.AutoModelForImageTextToText)
    model = model_class.from_pretrained(name_or_path, dtype=getattr(torch, dtype), **hub)
    return model.to(device).eval()


def default_prune_layer(model: torch.nn.Module, preferred: int = 3) -> int:
    """`preferred` (the `STTSConfig` default), lowered to the deepest block this model allows (tiny test models)."""
    from .registry import find_architecture

    entry = find_architecture(model)
    limit = entry.vision_spec(model).num_blocks - 2
    last_read = entry.last_block(model)
    if last_read is not None:
        limit = min(limit, last_read - 1)
    return max(0, min(preferred, limit))


def wrap_model(model: torch.nn.Module, args: argparse.Namespace, prune_ratio: float | None = None, train: bool = False):
    """The model with STTS: `STTSModel.from_pretrained(model, args.adapter)`, or without an adapter `apply_stts` with
    `args.method` and `args.prune_layer`.

    Args:
        model: the base model.
        args (`argparse.Namespace`): the command's options.
        prune_ratio (`float`, *optional*): overrides the adapter's (default without an adapter: 0.5).
        train (`bool`): leave every parameter trainable (to time a full training step).
    """
    from .model import STTSModel, apply_stts

    if args.adapter:
        stts = STTSModel.from_pretrained(model, args.adapter, revision=args.adapter_revision)
        if prune_ratio is not None:
            stts.set_prune_ratio(prune_ratio)
        if train:
            stts.requires_grad_(True)
        return stts
    prune_layer = args.prune_layer if args.prune_layer is not None else default_prune_layer(model)
    config = STTSConfig(
        prune_ratio=0.5 if prune_ratio is None else prune_ratio,
        prune_layer=prune_layer,
        method=args.method,
        train_base_model=train,
    )
    torch.manual_seed(0)
    return apply_stts(model, config).eval()


# ----------------------------------------------------------------------------------------------- videos
def load_video(source: str, frames: int | None = None, size: int = 224) -> torch.Tensor:
    """Read a video as `(frames, 3, height, width)` floats in [0, 1].

    Args:
        source (`str`): "synthetic" (a square moving over a textured background,
            `stts_adapter.testing.moving_square_video`), a folder of frame images (sorted by name; needs Pillow), an
            animated GIF / WebP (Pillow), or a tensor file: `.npy` (numpy, no pickles), `.pt` / `.pth`
            (`torch.load(weights_only=True)`) or `.safetensors` (the tensor `video`, or the only one), laid out as
            `(frames, 3, H, W)` or `(frames, H, W, 3)`, uint8 or floats in [0, 1].
        frames (`int`, *optional*): synthetic: the frame count (default 8); files: keep this many frames, evenly
            spaced (default: all).
        size (`int`): side of the synthetic video's frames.

    Returns:
        `torch.Tensor`
    """
    if source == SYNTHETIC:
        from .testing import moving_square_video

        count = frames or 8
        square = max(8, size // 8)
        return moving_square_video(
            count, size, size, square=square, step=(size // 32, size // 16), start=(size // 4, 0)
        )
    if not os.path.exists(source):
        raise CLIError(f"--video {source!r} does not exist; pass a file, a folder of frames or {SYNTHETIC!r}.")
    suffix = os.path.splitext(source)[1].lower()
    if os.path.isdir(source):
        video = _read_frame_folder(source)
    elif suffix in IMAGE_SUFFIXES:
        video = _read_animated_image(source)
    elif suffix == ".npy":
        import numpy as np

        try:
            video = _as_video(torch.from_numpy(np.load(source, allow_pickle=False)), source)
        except ValueError as exc:
            raise CLIError(f"{source} is not a plain numpy array file ({exc}).") from exc
    elif suffix in (".pt", ".pth"):
        try:
            loaded = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise CLIError(f"{source} could not be read with torch.load(weights_only=True): {exc}") from exc
        if isinstance(loaded, dict):
            loaded = _pick_tensor(loaded, source)
        video = _as_video(loaded, source)
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        video = _as_video(_pick_tensor(load_file(source), source), source)
    else:
        raise CLIError(
            f"Cannot read {source!r}: pass a folder of frame images, an animated GIF, a .npy / .pt / .safetensors "
            f"tensor, or {SYNTHETIC!r}. To use a video file, extract frames first, e.g. "
            "`ffmpeg -i video.mp4 -vf fps=2 frames/%05d.png`, then `--video frames/`."
        )
    if frames is not None and frames < len(video):
        video = video[torch.linspace(0, len(video) - 1, frames).round().long()]
    return video


def _pick_tensor(tensors: dict, source: str) -> torch.Tensor:
    if "video" in tensors:
        return tensors["video"]
    if len(tensors) == 1:
        return next(iter(tensors.values()))
    raise CLIError(f"{source} holds tensors {sorted(tensors)}; name the video tensor 'video'.")


def _as_video(tensor: Any, source: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor):
        raise CLIError(f"{source} does not hold a tensor (got {type(tensor).__name__}).")
    if tensor.dim() == 3:  # (frames, H, W): grey
        tensor = tensor[:, None]
    if tensor.dim() != 4:
        raise CLIError(f"{source}: expected a (frames, 3, H, W) or (frames, H, W, 3) video, got {tuple(tensor.shape)}.")
    if tensor.shape[1] not in (1, 3) and tensor.shape[-1] in (1, 3):
        tensor = tensor.permute(0, 3, 1, 2)
    if tensor.shape[1] not in (1, 3):
        raise CLIError(f"{source}: no channel axis of size 3 in shape {tuple(tensor.shape)}.")
    if tensor.dtype == torch.uint8:
        tensor = tensor.float() / 255
    else:
        tensor = tensor.float()
        if tensor.numel() and float(tensor.max()) > 1.5:  # 0..255 stored as floats
            tensor = tensor / 255
    return tensor.expand(-1, 3, -1, -1).clamp(0, 1).contiguous()


def _pillow():
    try:
        from PIL import Image, ImageDraw, ImageFont, ImageSequence
    except ImportError as exc:
        raise CLIError(
            "Reading image frames and writing PNGs needs Pillow: pip install 'stts-adapter[cli]' (or pillow)."
        ) from exc
    return Image, ImageDraw, ImageFont, ImageSequence


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _image_to_tensor(image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.array(image.convert("RGB"), copy=True)).permute(2, 0, 1).float() / 255


def _read_frame_folder(folder: str) -> torch.Tensor:
    Image, *_ = _pillow()
    names = sorted((n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES)), key=_natural_key)
    if not names:
        raise CLIError(f"{folder} holds no frame images ({', '.join(IMAGE_SUFFIXES)}).")
    frames = []
    for name in names:
        with Image.open(os.path.join(folder, name)) as image:
            frames.append(_image_to_tensor(image))
    height, width = frames[0].shape[-2:]
    frames = [
        f if f.shape[-2:] == (height, width) else F.interpolate(f[None], size=(height, width), mode="bilinear")[0]
        for f in frames
    ]
    return torch.stack(frames).clamp(0, 1)


def _read_animated_image(path: str) -> torch.Tensor:
    Image, _, _, ImageSequence = _pillow()
    with Image.open(path) as image:
        return torch.stack([_image_to_tensor(frame) for frame in ImageSequence.Iterator(image)])


# ----------------------------------------------------------------------------------------------- drawing
def unit_grid(family: VideoFamily, config: Any, height: int, width: int, units_per_frame: int) -> tuple[int, int]:
    """(rows, columns) of units over a `height` x `width` frame, row-major as the placeholders are ordered."""
    if family.frames == "grid":
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
    Image, ImageDraw, ImageFont, _ = _pillow()
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


# ----------------------------------------------------------------------------------------------- inspect
def adapter_summary(adapter: str, revision: str | None = None) -> dict[str, Any]:
    """What `stts-adapter inspect` shows: config, base model and sizes of an adapter, without loading a model.

    Args:
        adapter (`str`): a folder written by `save_pretrained` or a Hub repo id.
        revision (`str`, *optional*): branch, tag or commit on the Hub.

    Returns:
        `dict` with `source`, `config` (every `STTSConfig` field), `files` (`{name: bytes}`), `tensors`
        (`{name: {"shape", "dtype"}}`) and `parameters`.
    """
    from safetensors import safe_open

    from .files import resolve_adapter_file
    from .io import WEIGHTS_NAME

    config_path = resolve_adapter_file(adapter, CONFIG_NAME, revision, None)
    weights_path = resolve_adapter_file(adapter, WEIGHTS_NAME, revision, None)
    config = STTSConfig.from_json_file(config_path)
    tensors = {}
    try:
        with safe_open(weights_path, framework="pt") as f:
            for key in sorted(f.keys()):
                piece = f.get_slice(key)
                dtype = str(piece.get_dtype())
                tensors[key] = {"shape": list(piece.get_shape()), "dtype": SAFETENSORS_DTYPES.get(dtype, dtype)}
    except Exception as exc:
        raise AdapterLoadError(f"{weights_path} is not a readable safetensors file ({exc}).") from exc
    return {
        "source": os.fspath(adapter),
        "revision": revision,
        "snapshot": os.path.dirname(config_path),
        "config": config.to_dict(),
        "files": {os.path.basename(p): os.path.getsize(p) for p in (config_path, weights_path)},
        "tensors": tensors,
        "parameters": sum(math.prod(t["shape"]) for t in tensors.values()),
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The human-readable form of `adapter_summary`."""
    c = summary["config"]
    base = c["base_model_name_or_path"] or "(unnamed)"
    dtypes = sorted({t["dtype"] for t in summary["tensors"].values()})
    weights = summary["files"].get("stts_model.safetensors", 0)
    source = summary["source"] + (f" @ {summary['revision']}" if summary["revision"] else "")
    lines = [
        f"STTS adapter {source}",
        f"  files            {summary['snapshot']}",
        "",
        "Base model",
        f"  name or path     {base}",
        f"  class            {c['base_model_class']} (family {c['architecture']})",
        f"  ViT              width {c['vision_hidden_size']}, {c['num_vision_blocks']} blocks, "
        f"{c['patches_per_unit']} patches per unit",
        "",
        "Pruning",
        f"  method           {c['method']}",
        f"  prune_ratio      {c['prune_ratio']} (of each video's units)",
        f"  prune_layer      {c['prune_layer']} (scores ViT block {c['prune_layer']}, prunes from block "
        f"{c['prune_layer'] + 2} on)",
        f"  keep_first_frame {c['keep_first_frame']}",
        f"  aux_loss_weight  {c['aux_loss_weight']}",
        f"  bias_min         {c['bias_min']:.4g}",
        "",
        "Weights",
        f"  scorer           {summary['parameters']:,d} parameters in {len(summary['tensors'])} tensors "
        f"({', '.join(dtypes) or 'none'}), {_bytes(weights)}",
        f"  saved with       stts_adapter {c['stts_adapter_version'] or '(unknown)'}",
        "",
        "Load it with",
        f"  STTSModel.from_pretrained({c['base_model_class']}.from_pretrained({base!r}), {summary['source']!r}"
        + (f", revision={summary['revision']!r})" if summary["revision"] else ")"),
    ]
    return "\n".join(lines)


def _bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return ""


def run_inspect(args: argparse.Namespace) -> int:
    summary = adapter_summary(args.adapter, revision=args.revision)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


# ----------------------------------------------------------------------------------------------- bench
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def alternate(
    baseline: Callable[[], object], pruned: Callable[[], object], repeats: int, tick: Callable[[], None]
) -> tuple[float, float]:
    """Median seconds of `baseline` and `pruned`, measured alternately after one warm-up run of each (as
    `benchmarks/speed.py` does). `tick()` is called after every run."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for round_ in range(repeats + 1):
        for index, run in enumerate((baseline, pruned)):
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
            if round_:
                times[index].append(elapsed)
            tick()
    return statistics.median(times[0]), statistics.median(times[1])


def run_bench(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .testing import moving_square_video

    progress_off = args.no_progress or None
    _note(args, f"Loading {args.model} ...")
    model = load_base_model(args.model, args.revision, args.dtype, args.device)
    name, family = video_family(model)
    stts = wrap_model(model, args, train=args.train)
    normalization = processor_normalization(args.model, args.revision)
    device = torch.device(args.device)
    ratios = args.ratios if args.ratios else [stts.stts_config.prune_ratio]
    cases = [(frames, ratio) for frames in args.frames for ratio in ratios]
    runs_per_case = 2 * (args.repeats + 1) * (2 if args.train else 1)
    results = []
    with tqdm(total=len(cases) * runs_per_case, desc="bench", unit="run", disable=progress_off) as bar:
        for frames, ratio in cases:
            bar.set_description(f"bench {frames} frames, {ratio:.0%}")
            stts.set_prune_ratio(ratio)
            video, pixels = prepare_video(
                moving_square_video(frames, args.size, args.size), family, model.config, args.size, normalization
            )
            batch = build_video_batch(model, family, pixels, labels=args.train)
            results.append(_measure(stts, batch, device, args, frames, ratio, tuple(video.shape[-2:]), bar.update))
    header = _bench_header(args, stts, name, normalization)
    table = bench_table(results, train=args.train)
    print(header + "\n\n" + table)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"setup": header, "results": results}, f, indent=2)
    return 0


def _measure(stts, batch, device, args, frames, ratio, size, tick) -> dict[str, Any]:
    def forward() -> None:
        with torch.no_grad():
            stts(**batch)
        _synchronize(device)

    def train_step() -> None:
        stts(**batch).loss.backward()
        stts.zero_grad(set_to_none=True)
        _synchronize(device)

    def without_stts(run: Callable[[], None]) -> Callable[[], None]:
        def run_base() -> None:
            with stts.disable_stts():
                run()

        return run_base

    stts.eval()
    reports = []
    handle = stts.register_report_hook(reports.append)  # what the timed STTS runs pruned
    try:
        base_s, stts_s = alternate(without_stts(forward), forward, args.repeats, tick)
    finally:
        handle.remove()
    report = reports[-1]
    result = {
        "frames": frames,
        "frame_size": list(size),
        "prune_ratio": ratio,
        "video_tokens": report.units_before[0],
        "video_tokens_kept": report.units_after[0],
        "forward_s": {"baseline": base_s, "stts": stts_s, "speedup": base_s / stts_s},
    }
    if args.train:
        stts.train()
        base_s, stts_s = alternate(without_stts(train_step), train_step, args.repeats, tick)
        stts.eval()
        result["train_step_s"] = {"baseline": base_s, "stts": stts_s, "speedup": base_s / stts_s}
    return result


def _bench_header(args, stts, family_name: str, normalization: Normalization | None) -> str:
    c = stts.stts_config
    if args.adapter:
        source = f"adapter {args.adapter}"
    else:
        source = f"method {c.method}" + (" (untrained scorer: speed only)" if c.method == "scorer" else "")
    pixels = f"normalised as in {normalization.source}" if normalization else "pixels in [0, 1]"
    return (
        f"{c.base_model_class} ({family_name}) from {args.model}; {source}; prune_layer {c.prune_layer}.\n"
        f"Synthetic video ({pixels}); {args.device}, {args.dtype}, torch {torch.__version__}, {platform.machine()}, "
        f"{torch.get_num_threads()} threads.\n"
        f"Medians of {args.repeats} runs after a warm-up, baseline (STTS disabled) and STTS alternated."
    )


def bench_table(results: list[dict[str, Any]], train: bool = False) -> str:
    """A markdown table of `stts-adapter bench` results."""
    head = "| frames | frame size | prune ratio | video tokens | forward baseline | forward STTS | speed-up |"
    rule = "|---|---|---|---|---|---|---|"
    if train:
        head += " train step baseline | train step STTS | speed-up |"
        rule += "---|---|---|"
    lines = [head, rule]
    for r in results:
        f = r["forward_s"]
        line = (
            f"| {r['frames']} | {r['frame_size'][0]}x{r['frame_size'][1]} | {r['prune_ratio']:.0%} "
            f"| {r['video_tokens']} -> {r['video_tokens_kept']} | {f['baseline'] * 1000:.1f} ms "
            f"| {f['stts'] * 1000:.1f} ms | {f['speedup']:.2f}x |"
        )
        if train:
            t = r["train_step_s"]
            line += f" {t['baseline'] * 1000:.1f} ms | {t['stts'] * 1000:.1f} ms | {t['speedup']:.2f}x |"
        lines.append(line)
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- visualize
def run_visualize(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if not args.adapter and args.method == "scorer":
        raise CLIError(
            "Without --adapter there is no trained scorer to show (a fresh one prunes arbitrarily): pass "
            "--adapter PATH_OR_REPO_ID, or --method similarity / random for a training-free baseline."
        )
    _pillow()  # fail before the slow steps if Pillow is missing
    steps = ["load model", "read video", "prune", "draw"]
    with tqdm(total=len(steps), desc=steps[0], unit="step", disable=args.no_progress or None) as bar:
        model = load_base_model(args.model, args.revision, args.dtype, args.device)
        name, family = video_family(model)
        stts = wrap_model(model, args, prune_ratio=args.prune_ratio)
        bar.update()
        bar.set_description(steps[1])
        normalization = processor_normalization(args.model, args.revision)
        video = load_video(args.video, args.frames, args.size or 224)
        size = args.size if args.size or max(video.shape[-2:]) <= MAX_DEFAULT_SIDE else MAX_DEFAULT_SIDE
        frames, pixels = prepare_video(video, family, model.config, size, normalization)
        batch = build_video_batch(model, family, pixels)
        bar.update()
        bar.set_description(steps[2])
        with torch.no_grad():
            report = stts(**batch).stts
        bar.update()
        bar.set_description(steps[3])
        keep_mask = report.keep_masks[0].cpu()
        count, _, height, width = frames.shape
        grid = unit_grid(family, model.config, height, width, keep_mask.shape[1])
        keep = kept_pixels(keep_mask, grid, count, height, width)
        slot_of_frame = (torch.arange(count) * keep_mask.shape[0] // count).tolist()
        per_slot = keep_mask.sum(1).tolist()
        captions = [f"#{index} kept {per_slot[slot]}/{keep_mask.shape[1]}" for index, slot in enumerate(slot_of_frame)]
        sheet, _ = render_kept_units(frames, keep, captions, columns=args.columns)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        sheet.save(args.out)
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
    print(f"Wrote {args.out}: kept units as they are, pruned units dimmed.")
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
                },
                f,
            )
    return 0


# ----------------------------------------------------------------------------------------------- parsing
@contextlib.contextmanager
def _progress_bars(enabled: bool):
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


def _note(args: argparse.Namespace, message: str) -> None:
    if not args.no_progress:
        print(message, file=sys.stderr)


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a prune ratio (0 <= ratio < 1)")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


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
    bench.add_argument("--frames", type=_positive, nargs="+", default=[8, 16, 32], help="frame counts")
    bench.add_argument("--ratios", type=_ratio, nargs="+", help="prune ratios (default 0.5, or the adapter's)")
    bench.add_argument("--size", type=_positive, default=224, help="synthetic frame side in pixels (default 224)")
    bench.add_argument("--repeats", type=_positive, default=3, help="timed runs per variant (default 3)")
    bench.add_argument("--train", action="store_true", help="also time a training step (every parameter trained)")
    bench.set_defaults(run=run_bench, method="scorer")

    visualize = commands.add_parser(
        "visualize",
        parents=[model_options],
        help="frames of a video with the units STTS keeps highlighted",
        description="Run the model with STTS on a video and draw its frames: kept units as they are, pruned units "
        "dimmed. Needs Pillow.",
    )
    visualize.add_argument(
        "--video",
        default=SYNTHETIC,
        help="'synthetic', a folder of frame images, an animated GIF, or a .npy / .pt / .safetensors tensor",
    )
    visualize.add_argument(
        "--frames", type=_positive, help="synthetic: frame count (default 8); files: keep this many, evenly spaced"
    )
    visualize.add_argument(
        "--size",
        type=_positive,
        help="longer frame side to resize to, for families that take any size such as Qwen (default: the video's "
        f"own, at most {MAX_DEFAULT_SIDE}; 224 if synthetic); the others always use the model's input size",
    )
    visualize.add_argument("--prune-ratio", type=_ratio, help="fraction of units to prune (default: the adapter's)")
    visualize.add_argument("--columns", type=_positive, help="frames per row of the picture (default up to 8)")
    visualize.add_argument("--out", default="kept.png", help="PNG to write (default kept.png)")
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
    convert.add_argument("--prune-ratio", type=_ratio, default=0.5, help="default prune ratio (default 0.5)")
    convert.add_argument("--num-heads", type=_positive, help="pooler query heads (grouped-query attention only)")
    convert.add_argument("--num-vision-blocks", type=_positive, help="ViT depth, if the checkpoint holds no block")
    convert.add_argument("--base-model", help="Hub id of the HF Molmo2 model to record, e.g. allenai/Molmo2-4B")
    convert.set_defaults(run=run_convert_molmo2)
    return parser


def run_convert_molmo2(args: argparse.Namespace) -> int:
    from .convert import convert_molmo2_checkpoint

    config = convert_molmo2_checkpoint(
        args.checkpoint,
        args.out,
        prune_layer=args.prune_layer,
        prune_ratio=args.prune_ratio,
        num_heads=args.num_heads,
        num_vision_blocks=args.num_vision_blocks,
        base_model_name_or_path=args.base_model,
    )
    print(
        f"wrote {args.out}: a {config.vision_hidden_size}-wide scorer (MLP {config.scorer_hidden_size}) for a "
        f"{config.num_vision_blocks}-block Molmo2 ViT, reading block {config.prune_layer}"
    )
    return 0


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
        with _progress_bars(enabled=not getattr(args, "no_progress", False)):
            return args.run(args)
    except (CLIError, AdapterLoadError, STTSConfigError, STTSInputError, UnsupportedModelError, OSError) as exc:
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
