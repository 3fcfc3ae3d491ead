"""`stts-adapter inspect`: config, base model and sizes of an adapter, without loading a model."""

from __future__ import annotations

import argparse
import json
import math
import os
from typing import Any

from ..config import CONFIG_NAME, STTSConfig
from ..errors import AdapterLoadError
from .common import SAFETENSORS_DTYPES


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

    from ..files import resolve_adapter_file
    from ..io import WEIGHTS_NAME

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
