"""Adapter files: `stts_config.json` + `stts_model.safetensors` + a model card; local directories and the Hub.

Only JSON and safetensors are ever read, so nothing in an adapter can run code. Every check happens before the
base model is touched, so a failed load leaves it unchanged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import re
import tempfile
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import HfApi
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

from .config import CONFIG_NAME, WEIGHTS_HASH, STTSConfig
from .errors import AdapterLoadError
from .files import resolve_adapter_file
from .registry import find_architecture, unwrap_peft
from .scorer import build_scorer

if TYPE_CHECKING:
    from torch import nn

    from .model import STTSModel

WEIGHTS_NAME = "stts_model.safetensors"
EMBEDDED_CONFIG = "stts_config"  # the safetensors header key holding the weights' own config (JSON)
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

    Every file is written to a temporary file in the folder and renamed over its target (a rename is atomic and
    replaces a symlink at the target instead of writing through it). The weights go first and carry their own
    config in the safetensors header; `stts_config.json` goes next and records the weights' sha256. A process
    killed between the two leaves new weights beside the old config: the loader sees the hash differ and takes the
    config the weights carry.

    Args:
        save_directory: created if missing.
        config (`STTSConfig`): the adapter's config.
        tensors (`dict[str, torch.Tensor]`): the adapter's tensors (`scorer.<name>`).
        training (`Mapping`, *optional*): training details for the model card.
    """
    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {os.fspath(save_directory)!r} is a file; pass a directory.")
    os.makedirs(save_directory, exist_ok=True)
    config_json = json.dumps({**config.to_dict(), WEIGHTS_HASH: None}, indent=2, sort_keys=True)
    weights = save(tensors, metadata={"format": "pt", EMBEDDED_CONFIG: config_json})
    _write_atomically(os.path.join(save_directory, WEIGHTS_NAME), weights)
    manifest = {**config.to_dict(), WEIGHTS_HASH: hashlib.sha256(weights).hexdigest()}
    manifest_json = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    _write_atomically(os.path.join(save_directory, CONFIG_NAME), manifest_json.encode())
    _write_atomically(os.path.join(save_directory, "README.md"), model_card(config, training).encode("utf-8"))


def _write_atomically(path: str, data: bytes) -> None:
    """`data` into a new temporary file beside `path`, synced, then renamed over `path`."""
    descriptor, temporary = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-", suffix=".partial")
    try:
        with os.fdopen(descriptor, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


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
    config = _config_of_weights(config_path, weights_path)

    transformers_model = unwrap_peft(model)
    entry = find_architecture(transformers_model)
    spec = entry.vision_spec(transformers_model)
    _check_fits(config, entry.name, type(transformers_model).__name__, spec, path_or_repo_id)

    with torch.device("meta"):  # shapes only: nothing is allocated for a config that asks for a huge scorer
        expected = build_scorer(config, spec)
    expected_shapes = {} if expected is None else {SCORER_PREFIX + k: v.shape for k, v in expected.state_dict().items()}
    _check_tensors(_read_header(weights_path), expected_shapes, weights_path)  # before reading any tensor data
    tensors = _read_safetensors(weights_path)
    _check_values(tensors, weights_path)

    stts_model = model_class(model, config)
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
def _config_of_weights(config_path: str, weights_path: str) -> STTSConfig:
    """The config that belongs to the weights: `stts_config.json` when it records their hash (or no hash: written by
    an older version), else the config the weights carry (the JSON is from another save: an interrupted one)."""
    config = STTSConfig.from_json_file(config_path)
    recorded = config.weights_sha256
    if recorded is None or recorded == _sha256(weights_path):
        return config
    embedded = _embedded_config(weights_path)
    if embedded is None:  # weights written by other means: the checks of the tensors against the config decide
        return config
    warnings.warn(
        f"{config_path} belongs to another save than {weights_path} (an interrupted save_pretrained?); using the "
        "config stored with the weights. Save the adapter again to make the folder consistent.",
        stacklevel=3,
    )
    return embedded


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _embedded_config(weights_path: str) -> STTSConfig | None:
    """The config a weights file written by `write_adapter` carries (None: none, or unreadable: reading the tensors
    reports that)."""
    try:
        with safe_open(weights_path, framework="pt") as f:
            text = (f.metadata() or {}).get(EMBEDDED_CONFIG)
    except (SafetensorError, OSError, ValueError):
        return None
    if text is None:
        return None
    try:
        return STTSConfig.from_dict(json.loads(text))
    except (ValueError, TypeError, RecursionError) as exc:
        raise AdapterLoadError(f"The config stored in {weights_path} is not valid: {exc}") from exc


def _check_fits(config: STTSConfig, architecture: str, model_class: str, spec: Any, source: Any) -> None:
    made_for = (config.architecture, config.vision_hidden_size, config.num_vision_blocks, config.patches_per_unit)
    given = (architecture, spec.hidden_size, spec.num_blocks, spec.patches_per_unit)
    if made_for != given:
        raise AdapterLoadError(
            f"The STTS adapter {os.fspath(source)!r} was made for {config.base_model_class} "
            f"({config.base_model_name_or_path or 'unnamed'}; architecture {config.architecture}, ViT width "
            f"{config.vision_hidden_size}, {config.num_vision_blocks} blocks, {config.patches_per_unit} patches per "
            f"unit), but the model given is {model_class} (architecture {architecture}, ViT width "
            f"{spec.hidden_size}, {spec.num_blocks} blocks, {spec.patches_per_unit} patches per unit). Load it onto "
            "the base model it was trained for."
        )


FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of the dtypes a scorer's weights may have


def _read_header(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """`{name: (shape, safetensors dtype)}` from the file's header, without reading tensor data."""
    try:
        with safe_open(path, framework="pt") as f:
            return {
                key: (tuple(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype())
                for key in f.keys()  # noqa: SIM118 (safe_open is not a dict)
            }
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupted. Download or "
            "save the adapter again."
        ) from exc


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupted. Download or "
            "save the adapter again."
        ) from exc


def _check_tensors(header: dict[str, tuple[tuple[int, ...], str]], expected: dict[str, torch.Size], path: str) -> None:
    """The file holds exactly the scorer its config describes: the same names and shapes, float dtypes."""
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    wrong = sorted(k for k in set(expected) & set(header) if header[k][0] != tuple(expected[k]))
    if missing or unexpected or wrong:
        details = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else ""]
        details += [f"{k}: file {header[k][0]} vs expected {tuple(expected[k])}" for k in wrong]
        raise AdapterLoadError(
            f"{path} does not match the scorer its config describes ({'; '.join(d for d in details if d)}). The "
            "weights and stts_config.json come from different adapters, or the file was edited."
        )
    not_float = sorted(f"{k} ({dtype})" for k, (_, dtype) in header.items() if dtype not in FLOAT_DTYPES)
    if not_float:
        raise AdapterLoadError(
            f"{path} holds non-float tensors where the scorer's float weights belong: {not_float}. It was not written "
            "by save_pretrained; save the adapter again."
        )


def _check_values(tensors: dict[str, torch.Tensor], path: str) -> None:
    """Refuse NaN and infinite weights: they would make every score NaN."""
    bad = sorted(k for k, tensor in tensors.items() if not bool(torch.isfinite(tensor).all()))
    if bad:
        raise AdapterLoadError(
            f"{path} holds NaN or infinite values in {bad}; the adapter is broken. Train or save it again."
        )
