"""An adapter's files: where they are (a local folder or a Hub repo, downloaded into the Hub cache), and reading them
strictly, whoever made them: regular files only, bounded sizes, strict JSON."""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections import Counter
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
        if not os.path.lexists(candidate):  # a FIFO or a device there is refused when opened, not waited on
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


# ------------------------------------------------------------------------------------------------------ strict reading
class RegularFile:
    """An open regular file, read through one descriptor (every read sees the same file, even if a concurrent
    `save_pretrained` replaces the path meanwhile).

    Args:
        path (`str` or `os.PathLike`): the file; a symlink is followed (the Hub cache links to its blobs).

    Raises:
        AdapterLoadError: if `path` cannot be opened or is not a regular file (a FIFO, a device, a folder), which
            could block a read or never end.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        try:
            # O_NONBLOCK: opening a FIFO would otherwise wait for a writer forever. It changes nothing for files.
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            raise AdapterLoadError(f"Cannot open {self.path}: {exc}. Check the adapter folder and its files.") from exc
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise AdapterLoadError(
                f"{self.path} is not a regular file (a FIFO, a device or a folder, or a link to one); an adapter's "
                "files are plain files. Save or download the adapter again."
            )
        self.size = info.st_size
        self._file = os.fdopen(fd, "rb", buffering=0)

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes from `offset`.

        Raises:
            AdapterLoadError: if the file ends before that (it is shorter than it claims).
        """
        data = self.read_at_most(offset, length)
        if len(data) < length:
            raise AdapterLoadError(
                f"{self.path} ends at byte {offset + len(data)}, before the {length} bytes from byte {offset} it "
                "should hold: it is truncated. Save or download the adapter again."
            )
        return data

    def read_at_most(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes from `offset` (fewer only where the file ends)."""
        self._file.seek(offset)
        chunks, remaining = [], length
        while remaining > 0 and (chunk := self._file.read(min(remaining, 1 << 24))):
            chunks.append(chunk)
            remaining -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def __enter__(self) -> RegularFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_small_file(path: str | os.PathLike, max_bytes: int) -> bytes:
    """The whole content of a regular file of at most `max_bytes` bytes.

    Raises:
        AdapterLoadError: if it is not a regular file, or larger (nothing past `max_bytes` + 1 bytes is read, so a
            file that grows while it is read cannot make this allocate more).
    """
    with RegularFile(path) as f:
        data = f.read_at_most(0, max_bytes + 1)
    if len(data) > max_bytes:
        raise AdapterLoadError(
            f"{os.fspath(path)} is larger than {max_bytes} bytes, far more than this kind of file ever holds; it is "
            "not an STTS adapter file. Save or download the adapter again."
        )
    return data


def parse_json(data: bytes | str, source: str) -> Any:
    """Parse JSON strictly: duplicate keys (which two readers could resolve differently), the non-standard
    NaN / Infinity literals, invalid UTF-8 and nesting too deep for the parser are all refused.

    Args:
        data (`bytes` or `str`): the JSON text.
        source (`str`): what it is, for the message (e.g. the file's path).

    Raises:
        AdapterLoadError: naming `source` and what is wrong.
    """
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        return json.loads(text, object_pairs_hook=_without_duplicate_keys, parse_constant=_not_a_number)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise AdapterLoadError(
            f"{source} is not valid JSON ({reason}). Save the adapter again with STTSModel.save_pretrained, or fix "
            "the file."
        ) from exc


def _without_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        duplicates = sorted(key[:200] for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise ValueError(f"duplicate keys {duplicates[:10]}" + (" and more" if len(duplicates) > 10 else ""))
    return result


def _not_a_number(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# ------------------------------------------------------------------------------------------------------ atomic writing
def write_file_atomically(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` by a file holding `data`: a reader, or a process killed at any moment, sees the old file or the
    new one, never a mix.

    The data goes to a new temporary file in the same folder, is synced, and is renamed over `path` (a rename replaces
    a symlink at `path` instead of writing through it).

    Args:
        path (`str` or `os.PathLike`): the file to write; its folder must exist.
        data (`bytes`): the whole content.
    """
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=TEMPORARY_PREFIX, suffix=TEMPORARY_SUFFIX)
    try:
        with os.fdopen(descriptor, "wb") as f:
            if hasattr(os, "fchmod"):  # the mode a plain open() would give, not mkstemp's private 0600
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


TEMPORARY_PREFIX, TEMPORARY_SUFFIX = ".tmp-", ".partial"


def _umask() -> int:
    """The process's umask, read from /proc where Linux shows it (setting it to read it races with other threads)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
