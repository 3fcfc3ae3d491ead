"""Adapter files: `stts_config.json` + `stts_model.safetensors` + a model card; local directories and the Hub.

Only JSON and safetensors are ever read, so nothing in an adapter can run code. Every check happens before the
base model is touched, so a failed load leaves it unchanged.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import tempfile
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import HfApi
from safetensors import SafetensorError
from safetensors.torch import load, save

from .config import CONFIG_NAME, STTSConfig
from .errors import AdapterLoadError, STTSConfigError
from .files import RegularFile, parse_json, resolve_adapter_file, write_file_atomically
from .registry import find_architecture, unwrap_peft
from .scorer import build_scorer

if TYPE_CHECKING:
    from torch import nn

    from .model import STTSModel
    from .registry import VisionSpec

WEIGHTS_NAME = "stts_model.safetensors"
EMBEDDED_CONFIG = "stts_config"  # the safetensors header's metadata key holding the weights' own config (JSON)
DATA_HASH = "stts_data_sha256"  # ... and the one holding the sha256 of their tensor data
SCORER_PREFIX = "scorer."


def adapter_state_dict(model: STTSModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors under logical names (`scorer.<name>`), never base-model module paths."""
    if model.scorer is None:
        return {}
    return {SCORER_PREFIX + k: _full_tensor(v).detach().contiguous() for k, v in model.scorer.state_dict().items()}


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (an FSDP2 scorer: a collective, every process must call it)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def save_adapter(
    model: STTSModel,
    save_directory: str | os.PathLike,
    is_main_process: bool = True,
    training: Mapping[str, float | int | str] | None = None,
) -> None:
    """Write config, weights and model card into `save_directory`. See `STTSModel.save_pretrained`; `training`
    (numbers and short names, e.g. from the Trainer callback) goes into the model card's "Training" section."""
    tensors = adapter_state_dict(model)  # on every process: gathering an FSDP-sharded scorer is a collective
    if not is_main_process:
        return
    from . import __version__

    config = STTSConfig.from_dict({**model.stts_config.to_dict(), "stts_adapter_version": __version__})
    write_adapter(save_directory, config, tensors, training)


def write_adapter(
    save_directory: str | os.PathLike,
    config: STTSConfig,
    tensors: dict[str, torch.Tensor],
    training: Mapping[str, float | int | str] | None = None,
) -> None:
    """Write an adapter folder so that a reader always finds the old adapter or the new one, whole.

    Every file is written atomically (`files.write_file_atomically`). The weights go first and carry, in their
    safetensors header, their own config and the sha256 of their tensor data; `stts_config.json` goes next and
    records the same sha256; the model card comes last. A load pairs the two from their headers: a config that
    records another hash belongs to another save (one killed between the two renames), so the config the weights
    carry is used. The data is checked against the hash when it is read.

    Args:
        save_directory: created if missing.
        config (`STTSConfig`): the adapter's config.
        tensors (`dict[str, torch.Tensor]`): the adapter's tensors (`scorer.<name>`).
        training (`Mapping`, *optional*): training details for the model card.
    """
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {os.fspath(save_directory)!r} is a file; pass a directory.")
    os.makedirs(save_directory, exist_ok=True)
    data_sha256 = hashlib.sha256(_tensor_data(save(tensors))).hexdigest()
    config = dataclasses.replace(config, weights_sha256=data_sha256)
    embedded = dataclasses.replace(config, weights_sha256=None).to_json_string()
    metadata = {"format": "pt", EMBEDDED_CONFIG: embedded, DATA_HASH: data_sha256}
    weights = save(tensors, metadata=metadata)  # the metadata changes the header, not the data
    write_file_atomically(os.path.join(save_directory, WEIGHTS_NAME), weights)
    write_file_atomically(os.path.join(save_directory, CONFIG_NAME), config.to_json_string().encode("utf-8"))
    write_file_atomically(os.path.join(save_directory, "README.md"), model_card(config, training).encode("utf-8"))


def _tensor_data(safetensors_file: bytes) -> bytes:
    """The tensor data of a safetensors file: what follows its 8-byte header length and its header."""
    return safetensors_file[8 + int.from_bytes(safetensors_file[:8], "little") :]


def load_adapter(
    model_class: type[STTSModel],
    model: nn.Module,
    path_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    is_trainable: bool = False,
) -> STTSModel:
    """Check and load an adapter onto `model`. See `STTSModel.from_pretrained`."""
    config_path = resolve_adapter_file(path_or_repo_id, CONFIG_NAME, revision, token)
    weights_path = resolve_adapter_file(path_or_repo_id, WEIGHTS_NAME, revision, token)
    # The config is read before the weights are opened: a save replaces the weights first, so weights opened later
    # are at least as new as the config, and the hashes tell whether they are the config's own.
    saved_config = STTSConfig.from_json_file(config_path)

    transformers_model = unwrap_peft(model)
    entry = find_architecture(transformers_model)
    spec = entry.vision_spec(transformers_model)
    source = os.fspath(path_or_repo_id)
    with RegularFile(weights_path) as weights:
        header = read_weights_header(weights)
        config = _config_of_weights(saved_config, header, weights_path, source)
        _check_fits(config, entry.name, type(transformers_model).__name__, spec, source)
        _check_tensors(header, _expected_shapes(config, spec, source), weights_path)  # before reading any data
        tensors = _read_tensors(weights, header)
    _check_values(tensors, weights_path)

    try:
        stts_model = model_class(model, config)  # its own checks (e.g. prune_layer) run before it changes the model
    except STTSConfigError as exc:
        raise AdapterLoadError(f"The STTS adapter {source!r} cannot be used on this model: {exc}") from exc
    if config.base_model_name_or_path:  # keep the id the adapter was trained on, not a local path it was loaded from
        stts_model.stts_config.base_model_name_or_path = config.base_model_name_or_path
    if stts_model.scorer is not None:
        scorer_state = {k[len(SCORER_PREFIX) :]: v for k, v in tensors.items()}
        stts_model.scorer.load_state_dict(scorer_state, strict=True)
        stts_model.scorer.requires_grad_(is_trainable)
    if not is_trainable:
        stts_model.eval()
    return stts_model


def push_adapter_to_hub(
    model: STTSModel,
    repo_id: str,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str = "Upload STTS adapter",
    revision: str | None = None,
    create_pr: bool = False,
) -> Any:
    """Create `repo_id` if needed and upload the adapter folder to it.

    Args:
        model (`STTSModel`): the adapter to upload.
        repo_id (`str`): "org/name".
        private (`bool`, *optional*): visibility of a newly created repo.
        token (`str` or `bool`, *optional*): Hub token.
        commit_message (`str`): the commit message.
        revision (`str`, *optional*): branch to push to (created if it does not exist).
        create_pr (`bool`): open a pull request instead of committing to the branch.

    Returns:
        The `CommitInfo` of the upload.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not create_pr and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)  # as transformers' push_to_hub does
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
        )


def model_card(config: STTSConfig, training: Mapping[str, float | int | str] | None = None) -> str:
    """A Hub model card (README.md) for an adapter, in the style of PEFT's.

    Args:
        config (`STTSConfig`): the adapter's config.
        training (`Mapping`, *optional*): training details (steps, learning rates, measured kept fraction, ...),
            written as a table.
    """
    import transformers

    from . import __version__

    # Every string from the config is either checked against a strict pattern or written as an escaped literal, so
    # that no value (newlines, quotes, `---`, backticks) can leave the YAML front matter or the code snippet.
    base = config.base_model_name_or_path
    on_hub = base is not None and HUB_REPO_ID.fullmatch(base) is not None and not os.path.isdir(base)
    model_class = config.base_model_class if IDENTIFIER.fullmatch(config.base_model_class or "") else None
    front_matter = ["---", "library_name: stts-adapter"]
    if on_hub:
        front_matter.append(f"base_model: {_literal(base)}")
    front_matter += ["tags:", "- stts", "- token-pruning", "- video", f"- {_literal(config.architecture)}", "---"]
    base_name = _literal(base or "<base model id or path>")
    rows = "\n".join(
        f"| `{name}` | `{getattr(config, name)!r}` |"
        for name in ("method", "prune_ratio", "prune_layer", "aux_loss_weight", "keep_first_frame", "bias_min")
    )
    return (
        "\n".join(front_matter)
        + f"""

# STTS adapter for {base if on_hub else model_class or "a vision-language model"}

A Spatio-Temporal Token Scoring (STTS) scorer for `{model_class}` ({_literal(config.architecture)}). It scores
every video unit after ViT block {config.prune_layer} and drops the lowest-scoring {config.prune_ratio:.0%} of each
video's units from the rest of the ViT and from the LLM. Only the scorer's weights are stored here; load them on top
of the base model.

## How to load

```python
{_load_snippet(config, model_class, base_name)}
model = STTSModel.from_pretrained(base, "<this repo id or folder>")
model.set_prune_ratio({config.prune_ratio})  # optional: a runtime knob
```

Or in one call, with the base model this adapter records: `AutoSTTSModel.from_pretrained("<this repo id or folder>")`.

## Configuration

| field | value |
|---|---|
{rows}

{_training_section(training)}## Framework versions

- stts_adapter {__version__}
- transformers {transformers.__version__}
- torch {torch.__version__}
- Python {platform.python_version()}
"""
    )


HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,199}")


def _literal(value: str | None) -> str:
    """`value` as a double-quoted string that means the same in YAML and in Python and holds no newline, quote or
    backtick that could end the front matter, the code block or the literal."""
    return json.dumps(value, ensure_ascii=True).replace("`", "\\u0060")


def _training_section(training: Mapping[str, float | int | str] | None) -> str:
    if not training:
        return ""
    rows = "\n".join(
        f"| {_literal(str(key))[1:-1]} | `{_literal(str(value))[1:-1]}` |" for key, value in training.items()
    )
    return f"## Training\n\n| | |\n|---|---|\n{rows}\n\n"


def _load_snippet(config: STTSConfig, model_class: str | None, base_name: str) -> str:
    """The lines that load the base model, as its family does (timm: `timm.create_model`)."""
    if config.architecture == "timm_vit":
        name = config.base_model_name_or_path or "<timm model name>"
        name = name[len("timm/") :] if name.startswith("timm/") else name
        imports, load = "import timm", f"timm.create_model({_literal(name)}, pretrained=True)"
    else:
        loader = model_class or "AutoModelForImageTextToText"
        imports, load = f"from transformers import {loader}", f"{loader}.from_pretrained({base_name})"
    return f"{imports}\nfrom stts_adapter import STTSModel\n\nbase = {load}"


# ---------------------------------------------------------------------------------------------------- checks
@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors header: its dtype name ("F32", ...), shape and byte range in the data."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


@dataclasses.dataclass(frozen=True)
class WeightsHeader:
    """The parsed header of a safetensors file: its tensors by name, its `__metadata__` strings, where the data
    starts."""

    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int


MAX_HEADER_BYTES = 16 << 20  # ours are a few KB (names, shapes, the embedded config); safetensors allows 100 MB
# The dtypes a scorer's weights may be stored in (cast to the scorer's dtype on load), with their sizes in bytes.
# Integer, bool, complex or 8-bit float tensors are refused, not cast: no scorer is saved like that.
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
MAX_NAMES_SHOWN = 10


def read_weights_header(weights: RegularFile) -> WeightsHeader:
    """Parse and check the header of a safetensors file without reading tensor data: its length against the file,
    strict JSON, the type of every entry, and byte ranges that tile the data exactly (the file holds what the header
    says, no more and no less).

    Args:
        weights (`RegularFile`): the open weights file.

    Returns:
        `WeightsHeader`

    Raises:
        AdapterLoadError: naming what is wrong.
    """
    if weights.size < 8:
        raise _damaged(weights.path, f"it has {weights.size} bytes, fewer than a safetensors header's length field")
    length = int.from_bytes(weights.read(0, 8), "little")
    if length > MAX_HEADER_BYTES or 8 + length > weights.size:
        raise _damaged(weights.path, f"its header claims {length} bytes, but the file has {weights.size}")
    raw = parse_json(weights.read(8, length), f"The safetensors header of {weights.path}")
    if not isinstance(raw, dict):
        raise _damaged(weights.path, "its header is not a JSON object")
    metadata = raw.pop("__metadata__", None) or {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _damaged(weights.path, "its __metadata__ is not an object of strings")
    tensors = {name: _tensor_entry(name, value, weights.path) for name, value in raw.items()}
    _check_layout(tensors, weights.size - 8 - length, weights.path)
    return WeightsHeader(tensors, metadata, 8 + length)


def _tensor_entry(name: str, value: Any, path: str) -> TensorEntry:
    """One header entry, type-checked: {"dtype": str, "shape": [int >= 0, ...], "data_offsets": [start, end]}."""
    ok = isinstance(value, dict) and set(value) == {"dtype", "shape", "data_offsets"}
    ok = ok and isinstance(value["dtype"], str) and isinstance(value["shape"], list)
    ok = ok and isinstance(value["data_offsets"], list) and len(value["data_offsets"]) == 2
    ok = ok and all(_is_count(n) for n in [*value["shape"], *value["data_offsets"]])
    if not ok:
        raise _damaged(path, f"its header entry for {name[:200]!r} is malformed")
    start, end = value["data_offsets"]
    return TensorEntry(value["dtype"], tuple(value["shape"]), start, end)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_layout(tensors: dict[str, TensorEntry], data_size: int, path: str) -> None:
    """The tensors' byte ranges follow each other from 0 to the end of the data, without gaps or overlaps."""
    position = 0
    for entry in sorted(tensors.values(), key=lambda e: (e.start, e.end)):
        if entry.start != position or entry.end < entry.start:
            raise _damaged(path, "its header's byte ranges overlap or leave gaps")
        position = entry.end
    if position != data_size:
        raise _damaged(path, f"its header describes {position} bytes of tensor data, but the file holds {data_size}")


def _damaged(path: str, reason: str) -> AdapterLoadError:
    return AdapterLoadError(
        f"{path} is not a valid safetensors file ({reason}); it may be truncated or corrupted. Download or save the "
        "adapter again."
    )


def _config_of_weights(saved: STTSConfig, header: WeightsHeader, path: str, source: str) -> STTSConfig:
    """The config that belongs to the weights: `stts_config.json`'s (with any edit made to it) when it records the
    data hash the weights state, or when the weights carry no config (saved by other means); else the config the
    weights carry, with a warning (the JSON was written by another save: an interrupted one, or another adapter's)."""
    embedded_text = header.metadata.get(EMBEDDED_CONFIG)
    if embedded_text is None:
        return saved
    if saved.weights_sha256 is not None and saved.weights_sha256 == header.metadata.get(DATA_HASH):
        return saved
    embedded = STTSConfig.from_json_text(embedded_text, f"The config inside {path}")
    if dataclasses.replace(embedded, weights_sha256=None) == dataclasses.replace(saved, weights_sha256=None):
        return saved  # the same adapter whichever is read: nothing to warn about
    warnings.warn(
        f"The stts_config.json of the STTS adapter {source!r} does not belong to its {WEIGHTS_NAME} (written by "
        "another save: one interrupted between the two files, or another adapter's), so the config saved inside "
        f"{WEIGHTS_NAME} is used. Save the adapter again to make the two agree.",
        stacklevel=4,
    )
    return embedded


def _check_fits(config: STTSConfig, architecture: str, model_class: str, spec: VisionSpec, source: str) -> None:
    made_for = (config.architecture, config.vision_hidden_size, config.num_vision_blocks, config.patches_per_unit)
    given = (architecture, spec.hidden_size, spec.num_blocks, spec.patches_per_unit)
    if made_for != given:
        raise AdapterLoadError(
            f"The STTS adapter {source!r} was made for {config.base_model_class} "
            f"({config.base_model_name_or_path or 'unnamed'}; architecture {config.architecture}, ViT width "
            f"{config.vision_hidden_size}, {config.num_vision_blocks} blocks, {config.patches_per_unit} patches per "
            f"unit), but the model given is {model_class} (architecture {architecture}, ViT width "
            f"{spec.hidden_size}, {spec.num_blocks} blocks, {spec.patches_per_unit} patches per unit). Load it onto "
            "the base model it was trained for."
        )


def _expected_shapes(config: STTSConfig, spec: VisionSpec, source: str) -> dict[str, tuple[int, ...]]:
    """The shapes of the scorer `config` describes on this ViT, from a scorer built on the meta device (nothing is
    allocated for a config that asks for a huge one)."""
    try:
        with torch.device("meta"):
            scorer = build_scorer(config, spec)
    except STTSConfigError as exc:
        raise AdapterLoadError(f"The STTS adapter {source!r} cannot be used on this model: {exc}") from exc
    return {} if scorer is None else {SCORER_PREFIX + k: tuple(v.shape) for k, v in scorer.state_dict().items()}


def _check_tensors(header: WeightsHeader, expected: dict[str, tuple[int, ...]], path: str) -> None:
    """The file holds exactly the scorer its config describes: the same names and shapes, float dtypes, and byte
    ranges of the size their shapes need."""
    tensors = header.tensors
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    common = sorted(set(expected) & set(tensors))
    wrong = [
        f"{k}: file {_shape(tensors[k].shape)} vs expected {expected[k]}"
        for k in common
        if tensors[k].shape != expected[k]
    ]
    if missing or unexpected or wrong:
        details = [
            f"missing {_names(missing)}" if missing else "",
            f"unexpected {_names(unexpected)}" if unexpected else "",
        ]
        raise AdapterLoadError(
            f"{path} does not match the scorer its config describes ({'; '.join(d for d in [*details, *wrong] if d)}). "
            "The weights and stts_config.json come from different adapters, or the file was edited."
        )
    not_float = sorted(f"{k} ({tensors[k].dtype})" for k in common if tensors[k].dtype not in FLOAT_DTYPES)
    if not_float:
        raise AdapterLoadError(
            f"{path} holds tensors of non-float dtypes where the scorer's float weights belong: {not_float}; they are "
            f"refused, not cast. A scorer is saved in one of {sorted(FLOAT_DTYPES)}: save the adapter again."
        )
    for name in common:
        entry = tensors[name]
        if entry.end - entry.start != math.prod(entry.shape) * FLOAT_DTYPES[entry.dtype]:
            raise _damaged(path, f"its header gives {name} {entry.end - entry.start} bytes for shape {entry.shape}")


def _names(names: list[str]) -> str:
    """Tensor names for a message, cut short (a hostile header can hold thousands of long ones)."""
    shown = [name[:200] for name in names[:MAX_NAMES_SHOWN]]
    return f"{shown}" + (f" and {len(names) - MAX_NAMES_SHOWN} more" if len(names) > MAX_NAMES_SHOWN else "")


def _shape(shape: tuple[int, ...]) -> str:
    """A shape for a message, cut short (a hostile header can give a tensor 100000 dimensions)."""
    return str(shape) if len(shape) <= 8 else f"{str(shape[:8])[:-1]}, ... ({len(shape)} dimensions))"


def _read_tensors(weights: RegularFile, header: WeightsHeader) -> dict[str, torch.Tensor]:
    """Every tensor of the checked weights file, read through the descriptor its header was read from, after checking
    the data against the sha256 the header states (a bit flipped on disk or in a download, or an edit)."""
    content = weights.read(0, weights.size)
    stated = header.metadata.get(DATA_HASH)
    if stated is not None and hashlib.sha256(content[header.data_start :]).hexdigest() != stated:
        raise _damaged(weights.path, "its tensor data does not match the sha256 its header states")
    try:
        return load(content)
    except (SafetensorError, ValueError) as exc:
        raise _damaged(weights.path, str(exc)) from exc


def _check_values(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Refuse NaN and infinite weights: they would make every score NaN."""
    bad = sorted(k for k, tensor in tensors.items() if not bool(torch.isfinite(tensor).all()))
    if bad:
        raise AdapterLoadError(
            f"{path} holds NaN or infinite values in {_names(bad)}; the scorer it was saved from had diverged. Load "
            "an earlier checkpoint of the adapter, or train it again (e.g. with a lower learning rate)."
        )
