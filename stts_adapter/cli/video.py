"""Model families, base models and videos: how the command line turns a model id and a video into a batch."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import STTSConfig
from ..processing import VIDEO_SUFFIXES, decode_video_files
from ..visualization import pillow
from .common import IMAGE_SUFFIXES, SYNTHETIC, CLIError


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
    from ..registry import find_architecture, unwrap_peft

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
    from ..testing import Sample

    case = family.load_case()
    batch = case.build_batch(model.config, [Sample(video=pixels, answer=[5, 6] if labels else None)])
    return _to_model(batch, model)


@dataclass
class VideoInputs:
    """One video as the model takes it, and what a person should see of it.

    Args:
        batch (`dict`): the model's keyword arguments, on its device and dtype.
        frames (`torch.Tensor` of shape `(frames, 3, height, width)`): the frames fed in, in [0, 1].
        source (`str`): what built the batch, for the report (the checkpoint's processor, or the layout builder).
        unit_rows_columns (`tuple[int, int]`, *optional*): units per frame as (rows, columns), when the processor's
            output says (`video_grid_thw`); else derived from the frame size (`unit_grid`).
    """

    batch: dict[str, Any]
    frames: torch.Tensor
    source: str
    unit_rows_columns: tuple[int, int] | None = None


PROMPT = "Describe what happens in the video."


def load_processor(name_or_path: str, revision: str | None = None) -> Any | None:
    """The checkpoint's own processor (`AutoProcessor`), or None when the folder or repo ships none (a model saved
    without `processor.save_pretrained`). Processor files that are there but do not load give None too, with a
    warning that names the error: the video is then laid out without them, which the user should know."""
    from transformers import AutoProcessor, ProcessorMixin

    hub = {"revision": revision} if revision else {}
    try:
        processor = AutoProcessor.from_pretrained(name_or_path, **hub)
    except OSError:  # transformers' "Can't load ...": no processor, tokenizer or image processor files
        return None
    except (ValueError, KeyError, TypeError) as error:  # files there, but unreadable or of an unknown class
        warnings.warn(
            f"The processor of {name_or_path!r} did not load ({type(error).__name__}: {error}); its videos are laid "
            "out by the family's own builder instead. Fix or remove its processor files to use (or silence) them.",
            stacklevel=2,
        )
        return None
    return processor if isinstance(processor, ProcessorMixin) and hasattr(processor, "video_processor") else None


def input_preparation(name_or_path: str, revision: str | None = None) -> tuple[Any | None, Normalization | None]:
    """How a command prepares a checkpoint's videos: its own processor (`load_processor`), or without one the pixel
    normalisation its processor config states, for the family's layout builder (`processor_normalization`).

    Returns:
        `(processor, normalization)`: one of the two is None.
    """
    processor = load_processor(name_or_path, revision)
    return processor, None if processor else processor_normalization(name_or_path, revision)


def video_inputs(
    model: torch.nn.Module,
    family: VideoFamily,
    video: torch.Tensor,
    size: int | None,
    processor: Any | None,
    normalization: Normalization | None = None,
    labels: bool = False,
    model_name: str = "the model",
) -> VideoInputs:
    """The model inputs of one video: built by the checkpoint's own processor when it has one
    (`stts_adapter.prepare_inputs`, every frame given used: no frame sampling), else laid out by the family's builder
    (`build_video_batch`: placeholder token ids, pixels normalised with `normalization`).

    Args:
        model: the base model (the transformers VLM).
        family (`VideoFamily`): its family.
        video (`torch.Tensor` of shape `(frames, 3, height, width)`): in [0, 1].
        size (`int`, *optional*): see `frame_size`.
        processor: from `load_processor`, or None.
        normalization (`Normalization`, *optional*): pixels' mean and std for the builder.
        labels (`bool`): add labels on the prompt's last two tokens (for a training step).
        model_name (`str`): the model's folder or id, for the report.

    Returns:
        `VideoInputs`
    """
    config = model.config
    if processor is None:
        frames, pixels = prepare_video(video, family, config, size, normalization)
        source = (
            f"laid out by stts_adapter.testing's {family.case.split(':')[1]} builder with placeholder token ids: "
            f"{model_name} ships no processor (save one beside the model with processor.save_pretrained to use it)"
        )
        return VideoInputs(build_video_batch(model, family, pixels, labels=labels), frames, source)
    from ..processing import prepare_inputs

    frames, _ = prepare_video(video, family, config, size, None)
    clip = (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # as a video decoder gives it
    text = _prompt(processor, family)
    inputs = prepare_inputs(processor, model, text=[text], videos=[clip], return_tensors="pt", do_sample_frames=False)
    batch = dict(inputs)
    if labels:
        batch["labels"] = torch.full_like(batch["input_ids"], -100)
        batch["labels"][:, -2:] = batch["input_ids"][:, -2:]
    batch = _to_model(batch, model)
    grid = batch.get("video_grid_thw")
    rows_columns = None
    if grid is not None:
        merge = int(getattr(config.vision_config, "spatial_merge_size", 1))
        rows_columns = (int(grid[0, 1]) // merge, int(grid[0, 2]) // merge)
    return VideoInputs(batch, frames, f"built by the checkpoint's {type(processor).__name__}", rows_columns)


def _prompt(processor: Any, family: VideoFamily) -> str:
    """A one-video prompt in the checkpoint's chat template, or the family's video placeholder when it has none."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": PROMPT}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{family.load_case().video_prompt} {PROMPT}"


def _to_model(batch: dict[str, Any], model: torch.nn.Module) -> dict[str, Any]:
    """Tensors on the model's device; floating ones in its dtype."""
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
    from ..registry import find_architecture

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
    from ..model import STTSModel, apply_stts

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
            `stts_adapter.testing.moving_square_video`), a video file (.mp4, .mov, ...: needs torchcodec or PyAV,
            `pip install "stts-adapter[video]"`), a folder of frame images (sorted by name; needs Pillow), an
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
        from ..testing import moving_square_video

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
    elif suffix in VIDEO_SUFFIXES:
        try:
            decoded, _ = decode_video_files(source)  # the transformers video loader (torchcodec, else PyAV)
        except ImportError:
            raise
        except Exception as exc:  # the decoders raise their own error types for damaged files
            raise CLIError(f"{source} could not be decoded as a video ({exc}).") from exc
        video = _as_video(torch.from_numpy(decoded), source)
    else:
        raise CLIError(
            f"Cannot read {source!r}: pass a video file ({', '.join(VIDEO_SUFFIXES)}), a folder of frame images, an "
            f"animated GIF, a .npy / .pt / .safetensors tensor, or {SYNTHETIC!r}."
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


def _natural_key(name: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _image_to_tensor(image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.array(image.convert("RGB"), copy=True)).permute(2, 0, 1).float() / 255


def _read_frame_folder(folder: str) -> torch.Tensor:
    Image, *_ = pillow()
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
    Image, _, _, ImageSequence = pillow()
    with Image.open(path) as image:
        return torch.stack([_image_to_tensor(frame) for frame in ImageSequence.Iterator(image)])
