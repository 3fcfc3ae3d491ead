"""Adapter files: `stts_config.json` + `stts_model.safetensors` + a model card; local directories and the Hub.

Only JSON and safetensors are ever read, so nothing in an adapter can run code. Every check happens before the
base model is touched, so a failed load leaves it unchanged.
"""

from __future__ import annotations

import os
import platform
import tempfile
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import CONFIG_NAME, STTSConfig
from .errors import AdapterLoadError
from .registry import find_architecture, unwrap_peft
from .scorer import build_scorer

if TYPE_CHECKING:
    from torch import nn

    from .model import STTSModel

WEIGHTS_NAME = "stts_model.safetensors"
SCORER_PREFIX = "scorer."


def adapter_state_dict(model: STTSModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors under logical names (`scorer.<name>`), never base-model module paths."""
    if model.scorer is None:
        return {}
    return {SCORER_PREFIX + k: _full_tensor(v).detach().contiguous() for k, v in model.scorer.state_dict().items()}


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (an FSDP2 scorer: a collective, every process must call it)."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def save_adapter(model: STTSModel, save_directory: str | os.PathLike, is_main_process: bool = True) -> None:
    """Write config, weights and model card into `save_directory`. See `STTSModel.save_pretrained`."""
    tensors = adapter_state_dict(model)  # on every process: gathering an FSDP-sharded scorer is a collective
    if not is_main_process:
        return
    from . import __version__

    if os.path.isfile(save_directory):
        raise ValueError(f"save_directory {save_directory!r} is a file; pass a directory.")
    os.makedirs(save_directory, exist_ok=True)
    config = STTSConfig.from_dict({**model.stts_config.to_dict(), "stts_adapter_version": __version__})
    config.save_pretrained(save_directory)
    save_file(tensors, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
    card_path = os.path.join(save_directory, "README.md")
    with open(card_path, "w", encoding="utf-8") as f:
        f.write(model_card(config))


def load_adapter(
    model_class: type[STTSModel],
    model: nn.Module,
    path_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    token: str | bool | None = None,
    is_trainable: bool = False,
) -> STTSModel:
    """Check and load an adapter onto `model`. See `STTSModel.from_pretrained`."""
    config_path = _resolve(path_or_repo_id, CONFIG_NAME, revision, token)
    weights_path = _resolve(path_or_repo_id, WEIGHTS_NAME, revision, token)
    config = STTSConfig.from_json_file(config_path)

    transformers_model = unwrap_peft(model)
    entry = find_architecture(transformers_model)
    spec = entry.vision_spec(transformers_model)
    _check_fits(config, entry.name, type(transformers_model).__name__, spec, path_or_repo_id)

    expected = build_scorer(config, spec)
    expected_shapes = {} if expected is None else {SCORER_PREFIX + k: v.shape for k, v in expected.state_dict().items()}
    tensors = _read_safetensors(weights_path)
    _check_tensors(tensors, expected_shapes, weights_path)

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


def model_card(config: STTSConfig) -> str:
    """A Hub model card (README.md) for an adapter, in the style of PEFT's."""
    import transformers

    from . import __version__

    base = config.base_model_name_or_path
    on_hub = base is not None and not os.path.isabs(base) and base.count("/") == 1 and not os.path.isdir(base)
    front_matter = ["---", "library_name: stts-adapter"]
    if on_hub:
        front_matter.append(f"base_model: {base}")
    front_matter += ["tags:", "- stts", "- token-pruning", "- video", f"- {config.architecture}", "---"]
    base_name = base or "<base model id or path>"
    rows = "\n".join(
        f"| `{name}` | `{getattr(config, name)!r}` |"
        for name in ("method", "prune_ratio", "prune_layer", "aux_loss_weight", "keep_first_frame", "bias_min")
    )
    return (
        "\n".join(front_matter)
        + f"""

# STTS adapter for {base or config.base_model_class}

A Spatio-Temporal Token Scoring (STTS) scorer for `{config.base_model_class}` ({config.architecture}). It scores
every video unit after ViT block {config.prune_layer} and drops the lowest-scoring {config.prune_ratio:.0%} of each
video's units from the rest of the ViT and from the LLM. Only the scorer's weights are stored here; load them on top
of the base model.

## How to load

```python
from transformers import {config.base_model_class}
from stts_adapter import STTSModel

base = {config.base_model_class}.from_pretrained("{base_name}")
model = STTSModel.from_pretrained(base, "<this repo id or folder>")
model.set_prune_ratio({config.prune_ratio})  # optional: a runtime knob
```

## Configuration

| field | value |
|---|---|
{rows}

## Framework versions

- stts_adapter {__version__}
- transformers {transformers.__version__}
- torch {torch.__version__}
- Python {platform.python_version()}
"""
    )


# ---------------------------------------------------------------------------------------------------- checks
def _resolve(path_or_repo_id: str | os.PathLike, filename: str, revision: str | None, token: Any) -> str:
    path = os.fspath(path_or_repo_id)
    if os.path.isdir(path):
        candidate = os.path.join(path, filename)
        if not os.path.isfile(candidate):
            raise AdapterLoadError(f"{path} has no {filename}; it is not an STTS adapter folder (save_pretrained).")
        return candidate
    if os.path.exists(path):
        raise AdapterLoadError(f"{path} is a file; pass the adapter's folder or a Hub repo id.")
    try:
        return hf_hub_download(path, filename, revision=revision, token=token)
    except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, ValueError, OSError) as exc:
        raise AdapterLoadError(
            f"Could not get {filename} of the STTS adapter {path!r} (revision={revision!r}): {exc}. Pass a local "
            "folder written by save_pretrained, or a Hub repo id (and revision) that holds an STTS adapter."
        ) from exc


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


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterLoadError(
            f"{path} is not a readable safetensors file ({exc}); it may be truncated or corrupted. Download or "
            "save the adapter again."
        ) from exc


def _check_tensors(tensors: dict[str, torch.Tensor], expected: dict[str, torch.Size], path: str) -> None:
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tensors[k].shape != expected[k])
    if missing or unexpected or wrong:
        details = [f"missing {missing}" if missing else "", f"unexpected {unexpected}" if unexpected else ""]
        details += [f"{k}: file {tuple(tensors[k].shape)} vs expected {tuple(expected[k])}" for k in wrong]
        raise AdapterLoadError(
            f"{path} does not match the scorer its config describes ({'; '.join(d for d in details if d)}). The "
            "weights and stts_config.json come from different adapters, or the file was edited."
        )
