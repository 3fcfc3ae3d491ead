"""Where an adapter's files are: a local folder or a Hub repo (downloaded into the Hub cache)."""

from __future__ import annotations

import os
from typing import Any

from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

from .errors import AdapterLoadError


def resolve_adapter_file(path_or_repo_id: str | os.PathLike, filename: str, revision: str | None, token: Any) -> str:
    """The local path of `filename` in an adapter folder or Hub repo.

    Args:
        path_or_repo_id: a folder written by `save_pretrained`, or a Hub repo id.
        filename (`str`): e.g. `stts_config.json`.
        revision (`str`, *optional*): branch, tag or commit on the Hub.
        token (`str` or `bool`, *optional*): Hub token.

    Raises:
        AdapterLoadError: if the folder or the repo does not hold the file.
    """
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
