"""Share an STTS adapter through a Hub: push it, then pull it onto a fresh copy of the base model elsewhere.

    python examples/push_and_pull.py                  # runnable here: a loopback stand-in for the Hub (needs olah)
    python examples/push_and_pull.py --real-hub --repo-id you/tiny-qwen2.5-vl-stts   # huggingface.co (token, internet)

What it does: wraps a tiny Qwen2.5-VL with STTS, trains the scorer a few steps on synthetic video, pushes the adapter
with `push_to_hub` (and a second version to a branch), pulls both back with
`STTSModel.from_pretrained(vlm, repo_id, revision=...)` onto a freshly loaded base model, and checks that the pulled
model keeps exactly the same video units and gives exactly the same logits.

Without internet, the Hub is stood in for by two local pieces, so both directions really run:

- push: `HfApi` (which `push_to_hub` calls) is replaced by `GitRepoHub`, which commits each upload into a local git
  repo, one per Hub repo and a branch per revision, as the Hub stores them;
- pull: olah (https://pypi.org/project/olah/), a Hub mirror, runs offline on http://127.0.0.1:PORT serving those git
  repos through the Hub's HTTP API, and HF_ENDPOINT points huggingface_hub at it: the pull is the same HTTP download
  into the same Hub cache as from huggingface.co.

olah pins an older psutil, so it lives in a venv of its own: `make olah-venv` creates `.venv-olah` (or
`python3 -m venv .venv-olah && .venv-olah/bin/pip install olah==0.5.4`); pass `--olah-cli PATH` to use another one.
With `--real-hub` nothing is stood in for: log in first (`hf auth login` or HF_TOKEN).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo-id", default="stts-org/tiny-qwen2.5-vl-stts", help="the adapter's Hub repo")
    parser.add_argument("--real-hub", action="store_true", help="push to and pull from huggingface.co itself")
    parser.add_argument("--olah-cli", help="olah-cli executable (default: .venv-olah/bin/olah-cli, then PATH)")
    parser.add_argument("--workdir", help="keep the local Hub, the cache and the logs here (default: a temp dir)")
    parser.add_argument("--steps", type=int, default=3, help="scorer training steps before the push")
    return parser.parse_args()


# ---------------------------------------------------------------------------------------- the local stand-in
def find_olah_cli(given: str | None) -> str:
    for candidate in (given, os.environ.get("STTS_OLAH_CLI"), str(REPO_ROOT / ".venv-olah" / "bin" / "olah-cli")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.abspath(candidate)  # olah runs in another working directory
    found = shutil.which("olah-cli")
    if found is None:
        sys.exit(
            "olah is not installed. Run `make olah-venv` (or `python3 -m venv .venv-olah && .venv-olah/bin/pip "
            "install olah==0.5.4`), or pass --olah-cli PATH; or use --real-hub."
        )
    return os.path.abspath(found)


def git(repo: Path, *args: str) -> str:
    """git in `repo`, with a neutral configuration (no user hooks or signing)."""
    env = {
        **os.environ,
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_AUTHOR_NAME": "push_and_pull example",
        "GIT_AUTHOR_EMAIL": "example@stts.invalid",
        "GIT_COMMITTER_NAME": "push_and_pull example",
        "GIT_COMMITTER_EMAIL": "example@stts.invalid",
    }
    return subprocess.run(
        ["git", "-C", str(repo), *args], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()


def start_olah(executable: str, mirrors: Path, workdir: Path) -> tuple[subprocess.Popen, str]:
    """Start olah offline on a free loopback port serving the git repos under `mirrors`; wait until it answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = workdir / "olah.toml"
    config.write_text(
        f'[basic]\nhost = "127.0.0.1"\nport = {port}\nrepos-path = "{workdir / "olah-cache"}"\n'
        f'mirrors-path = ["{mirrors}"]\nmetadata-cache-ttl = 0\n[accessibility]\noffline = true\n'
    )
    log = open(workdir / "olah.log", "wb")  # noqa: SIM115 (the process writes to it until it stops)
    process = subprocess.Popen(
        [executable, "--config", str(config), "--log-path", str(workdir / "olah-logs")],
        cwd=workdir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            sys.exit(f"olah stopped at startup; see {workdir / 'olah.log'}")
        try:
            urllib.request.urlopen(f"{url}/api/models/probe/none", timeout=2).close()
            break
        except urllib.error.HTTPError:  # any HTTP answer: it serves
            break
        except OSError:
            if time.monotonic() > deadline:
                process.kill()
                sys.exit(f"olah did not answer at {url} within 60 s; see {workdir / 'olah.log'}")
            time.sleep(0.1)
    return process, url


class GitRepoHub:
    """Stands in for `huggingface_hub.HfApi` in `push_to_hub`: what is uploaded is committed into a local git repo,
    `<mirrors>/models/<org>/<name>`, on the branch the upload targets (the layout olah serves)."""

    def __init__(self, mirrors: Path, endpoint: str, user: str = "me") -> None:
        self.mirrors, self.endpoint, self.user = mirrors, endpoint, user
        self.commits: list[tuple[str, str, str]] = []  # (repo_id, branch, sha) of every upload

    def __call__(self, token=None, **kwargs) -> GitRepoHub:  # HfApi(token=...) returns the same stand-in
        return self

    def _repo(self, repo_id: str) -> Path:
        return self.mirrors / "models" / repo_id

    def create_repo(self, repo_id: str, *, private=None, exist_ok: bool = False, **kwargs):
        from huggingface_hub import RepoUrl

        repo_id = repo_id if "/" in repo_id else f"{self.user}/{repo_id}"
        repo = self._repo(repo_id)
        if (repo / ".git").exists() and not exist_ok:
            raise FileExistsError(f"{repo_id} exists")
        if not (repo / ".git").exists():
            repo.mkdir(parents=True)
            git(repo, "init", "--quiet", "--initial-branch=main")
            git(repo, "commit", "--quiet", "--allow-empty", "-m", "initial commit")  # as the Hub does
        return RepoUrl(f"{self.endpoint}/{repo_id}", endpoint=self.endpoint)

    def create_branch(self, repo_id: str, *, branch: str, exist_ok: bool = False, **kwargs) -> None:
        repo = self._repo(repo_id)
        if branch in git(repo, "branch", "--list", "--format=%(refname:short)").split():
            if not exist_ok:
                raise FileExistsError(f"branch {branch} exists")
            return
        git(repo, "branch", branch, "main")

    def upload_folder(self, *, repo_id: str, folder_path: str, commit_message: str, revision=None, **kwargs):
        from huggingface_hub import CommitInfo

        repo, branch = self._repo(repo_id), revision or "main"
        git(repo, "checkout", "--quiet", branch)
        shutil.copytree(folder_path, repo, dirs_exist_ok=True)
        git(repo, "add", "--all")
        git(repo, "commit", "--quiet", "-m", commit_message)
        sha = git(repo, "rev-parse", "HEAD")
        self.commits.append((repo_id, branch, sha))
        return CommitInfo(
            commit_url=f"{self.endpoint}/{repo_id}/commit/{sha}",
            commit_message=commit_message,
            commit_description="",
            oid=sha,
        )


# ---------------------------------------------------------------------------------------- the round trip
def main() -> None:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="stts-push-and-pull-") as temporary:
        workdir = Path(args.workdir or temporary).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        olah = None
        if not args.real_hub:
            mirrors = workdir / "hub-repos"
            mirrors.mkdir(exist_ok=True)
            olah, endpoint = start_olah(find_olah_cli(args.olah_cli), mirrors, workdir)
            # huggingface_hub reads these once, when it is imported: set them before importing it (or transformers).
            os.environ.update(HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(workdir / "hub-cache"), HF_HUB_OFFLINE="0")
            print(f"Local Hub: olah serving {mirrors} at {endpoint}")
        try:
            round_trip(args, stand_in=None if args.real_hub else GitRepoHub(mirrors, endpoint), workdir=workdir)
        finally:
            if olah is not None:
                olah.terminate()
                olah.wait(timeout=10)


def round_trip(args: argparse.Namespace, stand_in: GitRepoHub | None, workdir: Path) -> None:
    from contextlib import nullcontext
    from unittest import mock

    import torch
    from huggingface_hub import ModelCard, hf_hub_download
    from transformers import Qwen2_5_VLForConditionalGeneration

    from stts_adapter import STTSConfig, STTSModel, apply_stts
    from stts_adapter.testing import Sample, build_qwen_batch, moving_square_video, tiny_qwen2_5_vl_config

    # The base model, saved once: on the pushing side and on the pulling side it is the same checkpoint.
    torch.manual_seed(0)
    base_dir = workdir / "base-model"
    Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config()).save_pretrained(base_dir)
    config = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir).config
    video = moving_square_video(8, 112, 112)
    train_batch = build_qwen_batch(config, [Sample(video=video, answer=[5, 6])])
    batch = build_qwen_batch(config, [Sample(video=video)])

    # 1. Wrap, train the scorer a little, push; then push a second version to the branch "v2".
    model = apply_stts(Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir), STTSConfig(prune_layer=1))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(args.steps):
        model(**train_batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    intercept = nullcontext() if stand_in is None else mock.patch("stts_adapter.io.HfApi", stand_in)
    with intercept:
        pushed = model.push_to_hub(args.repo_id, commit_message="STTS adapter, 50% pruned")
        print(f"Pushed {args.repo_id}: {pushed.commit_url}")
        model.set_prune_ratio(0.25)
        pushed_v2 = model.push_to_hub(args.repo_id, revision="v2", commit_message="25% pruned")
        print(f"Pushed {args.repo_id}@v2: {pushed_v2.commit_url}")
    model.set_prune_ratio(0.5)
    with torch.no_grad():
        expected = model(**batch)

    # 2. Elsewhere: a fresh base model, the adapter pulled by repo id (main, then the branch).
    pulled = STTSModel.from_pretrained(Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir), args.repo_id)
    with torch.no_grad():
        out = pulled(**batch)
    same_scorer = all(
        torch.equal(a, b) for a, b in zip(model.scorer.state_dict().values(), pulled.scorer.state_dict().values())
    )
    same_units = all(torch.equal(a, b) for a, b in zip(out.stts.keep_masks, expected.stts.keep_masks))
    same_logits = torch.equal(out.logits, expected.logits)
    print(
        f"Pulled {args.repo_id}: prune_ratio {pulled.stts_config.prune_ratio}, same scorer weights: {same_scorer}, "
        f"same kept units: {same_units}, same logits: {same_logits}"
    )
    snapshot = Path(hf_hub_download(args.repo_id, "stts_config.json")).parent.name
    print(f"The pull resolved main to commit {snapshot} (the push made {pushed.oid}).")
    pulled_v2 = STTSModel.from_pretrained(
        Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir), args.repo_id, revision="v2"
    )
    print(f"Pulled {args.repo_id}@v2: prune_ratio {pulled_v2.stts_config.prune_ratio}")

    card = ModelCard.load(hf_hub_download(args.repo_id, "README.md"))
    print(f"Model card: library_name={card.data.library_name}, tags={card.data.tags}")
    if not (same_scorer and same_units and same_logits and snapshot == pushed.oid):
        sys.exit("The pulled adapter differs from the pushed one.")
    if pulled_v2.stts_config.prune_ratio != 0.25:
        sys.exit("The adapter pulled from the branch v2 is not the one pushed there.")
    print("Round trip OK.")


if __name__ == "__main__":
    main()
