"""A real Hub server on the loopback interface for tests: olah in offline mode, serving local git repos.

olah (https://pypi.org/project/olah/) is a Hub mirror; with `offline = true` it never contacts huggingface.co and
serves the git repos under its `mirrors-path` (`<mirrors>/models/<org>/<name>`, branches and commits as the Hub's
revisions) through the Hub's HTTP API (`/<org>/<name>/resolve/<revision>/<file>`), which `hf_hub_download` uses when
`HF_ENDPOINT` points at it. It is read-only: uploads answer 404.

olah pins an older psutil than the main environment, so it lives in its own venv (`make olah-venv` makes
`.venv-olah`) and runs as a subprocess; `olah_cli()` finds its executable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
OLAH_VERSION = "0.5.4"
INSTALL_HINT = (
    f"olah {OLAH_VERSION} (a loopback Hub server for the Hub tests) is not installed. Run `make olah-venv` (or "
    f"`python3 -m venv .venv-olah && .venv-olah/bin/pip install olah=={OLAH_VERSION}` in the repository root), or "
    "point STTS_OLAH_CLI at an olah-cli executable. Keep olah out of the main venv: it pins an older psutil."
)
GIT_ENV = {
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,  # no user hooks, signing or templates
    "GIT_AUTHOR_NAME": "stts tests",
    "GIT_AUTHOR_EMAIL": "tests@stts.invalid",
    "GIT_COMMITTER_NAME": "stts tests",
    "GIT_COMMITTER_EMAIL": "tests@stts.invalid",
}


def olah_cli() -> str | None:
    """The olah-cli executable: $STTS_OLAH_CLI, else `.venv-olah/bin/olah-cli` of the repository, else on PATH."""
    candidates = [os.environ.get("STTS_OLAH_CLI"), str(REPO_ROOT / ".venv-olah" / "bin" / "olah-cli")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)  # olah runs in another working directory
    found = shutil.which("olah-cli")
    return os.path.abspath(found) if found else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git(repo: Path, *args: str) -> str:
    """Run git in `repo` with a neutral configuration; returns its stdout, stripped."""
    result = subprocess.run(
        ["git", "-C", str(repo), *args],
        env={**os.environ, **GIT_ENV},
        check=True,
        capture_output=True,
        text=True,
    )
    return result.stdout.strip()


class MirrorRepos:
    """Local git repos laid out as olah's `mirrors-path` expects them (`<root>/models/<org>/<name>`)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, repo_id: str) -> Path:
        return self.root / "models" / repo_id

    def commit(self, repo_id: str, folder: Path, branch: str = "main", message: str = "Upload") -> str:
        """Make `branch` of `repo_id` hold exactly the files of `folder`, as one new commit.

        A new branch starts from main (created on first use). Returns the commit's 40-hex sha.
        """
        repo = self.path(repo_id)
        if not (repo / ".git").exists():
            repo.mkdir(parents=True, exist_ok=True)
            git(repo, "init", "--quiet", "--initial-branch=main")
        branches = git(repo, "branch", "--list", "--format=%(refname:short)").split()
        if branch in branches:
            git(repo, "checkout", "--quiet", branch)
        elif branches:
            git(repo, "checkout", "--quiet", "-b", branch, "main")
        else:
            git(repo, "checkout", "--quiet", "--orphan", branch)
        for entry in repo.iterdir():  # the branch holds exactly the folder's files
            if entry.name != ".git":
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        shutil.copytree(folder, repo, dirs_exist_ok=True)
        git(repo, "add", "--all")
        git(repo, "commit", "--quiet", "--allow-empty", "-m", message)
        return git(repo, "rev-parse", "HEAD")

    def tag(self, repo_id: str, name: str, commit: str) -> None:
        git(self.path(repo_id), "tag", name, commit)


class OlahServer:
    """An olah process serving `mirrors` at `url` (http://127.0.0.1:PORT), offline.

    Use as a context manager: the process is started on entry, and terminated (then killed if it lingers) on exit,
    whatever happens inside. Its config, cache and logs go to `workdir`.
    """

    def __init__(self, mirrors: MirrorRepos, workdir: Path, startup_timeout: float = 60.0) -> None:
        self.mirrors = mirrors
        self.workdir = Path(workdir)
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> OlahServer:
        executable = olah_cli()
        if executable is None:
            raise RuntimeError(INSTALL_HINT)
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "olah.toml"
        config.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.port}\n"
            f'repos-path = "{self.workdir / "cache"}"\n'
            f'mirrors-path = ["{self.mirrors.root}"]\n'
            "metadata-cache-ttl = 0\n"  # answer from the git repos as they are now
            "[accessibility]\n"
            "offline = true\n"
        )
        self.log = open(self.workdir / "olah.out", "wb")  # closed in __exit__
        self.process = subprocess.Popen(
            [executable, "--config", str(config), "--log-path", str(self.workdir / "logs")],
            cwd=self.workdir,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))},
        )
        try:
            self._wait_until_it_answers()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def _wait_until_it_answers(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"olah exited with status {self.process.returncode} at startup:\n{self.output()}")
            try:
                urllib.request.urlopen(f"{self.url}/api/models/startup-probe/none", timeout=2).close()
                return
            except urllib.error.HTTPError:  # any HTTP answer means it serves
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"olah did not answer at {self.url} within {self.startup_timeout:.0f} s:\n{self.output()}"
                    ) from None
                time.sleep(0.1)

    def output(self) -> str:
        self.log.flush()
        return (self.workdir / "olah.out").read_text(errors="replace")[-4000:]

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        with contextlib.suppress(Exception):
            self.log.close()

    def hub_environment(self, cache: Path) -> dict[str, str]:
        """The environment of a process that downloads from this server into the Hub cache `cache`."""
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
        environment.update(
            HF_ENDPOINT=self.url, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="0", HF_HUB_DISABLE_TELEMETRY="1"
        )
        return environment


def serving(mirrors: MirrorRepos, workdir: Path) -> Iterator[OlahServer]:
    """`with OlahServer(...)` as a generator, for pytest fixtures."""
    with OlahServer(mirrors, workdir) as server:
        yield server
