"""Adapters by Hub repo id from a real Hub server on the loopback interface: olah, offline, serving local git repos.

Every download here is an HTTP request to http://127.0.0.1:PORT answered by olah from a git repo the test wrote, so a
file's snapshot directory in the Hub cache is named by the git commit it came from: that is how the tests know what
was served. In this process huggingface_hub has already read HF_ENDPOINT / HF_HUB_OFFLINE / HF_HUB_CACHE (at import),
so the `hub` fixture patches `huggingface_hub.constants` (the endpoint, the URL template built from it at import, the
trusted hosts, offline mode and the cache); the subprocess tests set the environment variables instead, as a user
would. See tests/olah_server.py for the server; `make test` installs olah into `.venv-olah`.
"""

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard, hf_hub_download
from olah_server import INSTALL_HINT, REPO_ROOT, MirrorRepos, OlahServer, free_port, olah_cli
from test_adapter_io import assert_same_scorer, assert_untouched, snapshot
from test_qwen_vl import two_video_batch
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from stts_adapter import AdapterLoadError, STTSConfig, STTSModel, apply_stts
from stts_adapter.cli import VIDEO_FAMILIES, build_video_batch, load_video, main, prepare_video
from stts_adapter.testing import tiny_qwen2_5_vl_config, tiny_qwen2_vl_config

PRUNE_LAYER = 1
ADAPTER_REPO = "stts-org/tiny-qwen2.5-vl-stts"
MODEL_REPO = "stts-org/tiny-qwen2.5-vl"


# --------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def olah(tmp_path_factory):
    """One olah server for the module, serving `olah.mirrors` (repos can be added while it runs)."""
    if olah_cli() is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    root = tmp_path_factory.mktemp("olah")
    with OlahServer(MirrorRepos(root / "mirrors"), root / "server") as server:
        yield server


def point_hub_at(monkeypatch, endpoint: str, cache, offline: bool = False) -> None:
    """Make huggingface_hub, already imported, download from `endpoint` into `cache`."""
    constants = huggingface_hub.constants
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    hosts = getattr(constants, "HF_URL_HOSTS", frozenset())  # hosts whose redirects are followed (recent versions)
    monkeypatch.setattr(constants, "HF_URL_HOSTS", hosts | {"127.0.0.1"}, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    for name, value in (("HF_ENDPOINT", endpoint), ("HF_HUB_CACHE", str(cache)), ("HF_HUB_OFFLINE", str(int(offline)))):
        monkeypatch.setenv(name, value)  # for completeness: read only at import


@pytest.fixture
def hub(olah, tmp_path, monkeypatch):
    """This process downloads from the olah server into an empty cache in tmp_path; returns the cache."""
    cache = tmp_path / "hub-cache"
    point_hub_at(monkeypatch, olah.url, cache)
    return cache


def make_adapter(directory, seed, prune_ratio, model):
    torch.manual_seed(seed)
    stts = apply_stts(model, STTSConfig(prune_ratio=prune_ratio, prune_layer=PRUNE_LAYER))
    stts.save_pretrained(str(directory))
    return stts


@pytest.fixture(scope="module")
def published(olah, saved_models, tmp_path_factory):
    """On the server: ADAPTER_REPO with adapter A (50%) on main, tagged v1.0, and adapter B (25%, other weights) on the
    branch v2; MODEL_REPO with the tiny base model. Returns `{"a", "b", "main", "v2", "model"}` (adapters, commits)."""
    root = tmp_path_factory.mktemp("published")
    load = lambda: Qwen2_5_VLForConditionalGeneration.from_pretrained(saved_models["qwen2_5_vl"]).eval()
    a = make_adapter(root / "a", seed=0, prune_ratio=0.5, model=load())
    b = make_adapter(root / "b", seed=1, prune_ratio=0.25, model=load())
    assert any(not torch.equal(x, y) for x, y in zip(a.scorer.state_dict().values(), b.scorer.state_dict().values()))
    main = olah.mirrors.commit(ADAPTER_REPO, root / "a", "main", "adapter A")
    v2 = olah.mirrors.commit(ADAPTER_REPO, root / "b", "v2", "adapter B")
    olah.mirrors.tag(ADAPTER_REPO, "v1.0", main)
    model = olah.mirrors.commit(MODEL_REPO, saved_models["qwen2_5_vl"], "main", "tiny base model")
    return {"a": a.eval(), "b": b.eval(), "main": main, "v2": v2, "model": model}


# --------------------------------------------------------------------------------------------- the helper itself
def test_olah_serves_a_git_repo_and_is_stopped_on_exit(tmp_path):
    if olah_cli() is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "hello.txt").write_text("served from git")
    mirrors = MirrorRepos(tmp_path / "mirrors")
    sha = mirrors.commit("org/repo", tmp_path / "files")
    with OlahServer(mirrors, tmp_path / "server") as server:
        with urllib.request.urlopen(f"{server.url}/org/repo/resolve/main/hello.txt", timeout=10) as response:
            assert response.read() == b"served from git"
        head = urllib.request.Request(f"{server.url}/org/repo/resolve/main/hello.txt", method="HEAD")
        with urllib.request.urlopen(head, timeout=10) as response:
            assert response.headers["x-repo-commit"] == sha
        with pytest.raises(urllib.error.HTTPError):  # read-only, offline: nothing else exists
            urllib.request.urlopen(f"{server.url}/org/other/resolve/main/hello.txt", timeout=10)
        process, url = server.process, server.url
    assert process.poll() is not None  # stopped
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/org/repo/resolve/main/hello.txt", timeout=5)


# --------------------------------------------------------------------------------------------- pulls
def test_repo_id_loads_over_http_from_the_loopback_hub(load, published, hub, downloads):
    model = load()
    loaded = STTSModel.from_pretrained(model, ADAPTER_REPO)
    assert loaded.stts_config.prune_ratio == 0.5
    assert_same_scorer(loaded, published["a"])
    snapshot = hub / "models--stts-org--tiny-qwen2.5-vl-stts" / "snapshots" / published["main"]
    assert sorted(os.path.basename(p) for p in downloads) == ["stts_config.json", "stts_model.safetensors"]
    assert all(os.path.dirname(p) == str(snapshot) for p in downloads)  # named by the git commit: it was served
    batch = two_video_batch(model)
    with torch.no_grad():
        expected, out = published["a"](**batch), loaded(**batch)
    assert torch.equal(out.logits, expected.logits)
    assert all(torch.equal(m, e) for m, e in zip(out.stts.keep_masks, expected.stts.keep_masks))
    card = ModelCard.load(hf_hub_download(ADAPTER_REPO, "README.md"))
    assert card.data.library_name == "stts-adapter" and "stts" in card.data.tags
    assert "STTSModel.from_pretrained" in card.text


@pytest.mark.parametrize(
    ("revision", "expected", "commit"),
    [("v2", "b", "v2"), ("v1.0", "a", "main"), ("main-sha", "a", "main"), ("v2-sha", "b", "v2")],
    ids=["branch", "tag", "commit of main", "commit of v2"],
)
def test_revision_selects_a_branch_tag_or_commit_on_the_server(
    load, published, hub, downloads, revision, expected, commit
):
    revision = {"main-sha": published["main"], "v2-sha": published["v2"]}.get(revision, revision)
    loaded = STTSModel.from_pretrained(load(), ADAPTER_REPO, revision=revision)
    assert loaded.stts_config.prune_ratio == published[expected].stts_config.prune_ratio
    assert_same_scorer(loaded, published[expected])
    assert all(f"{os.sep}snapshots{os.sep}{published[commit]}{os.sep}" in p for p in downloads)


def test_a_new_push_is_what_the_next_pull_gets(load, olah, hub, tmp_path):
    repo = "stts-org/moving-target"
    first = make_adapter(tmp_path / "first", seed=2, prune_ratio=0.5, model=load())
    olah.mirrors.commit(repo, tmp_path / "first", message="first")
    assert_same_scorer(STTSModel.from_pretrained(load(), repo), first)
    second = make_adapter(tmp_path / "second", seed=3, prune_ratio=0.3, model=load())
    sha = olah.mirrors.commit(repo, tmp_path / "second", message="second")
    loaded = STTSModel.from_pretrained(load(), repo)  # main moved: resolved again on the server
    assert loaded.stts_config.prune_ratio == 0.3
    assert_same_scorer(loaded, second)
    assert (hub / "models--stts-org--moving-target" / "refs" / "main").read_text() == sha


def test_what_was_pulled_loads_offline_afterwards(load, published, hub, monkeypatch):
    STTSModel.from_pretrained(load(), ADAPTER_REPO)
    STTSModel.from_pretrained(load(), ADAPTER_REPO, revision="v2")
    # No server any more (a closed port) and offline mode: the cache the server filled answers.
    point_hub_at(monkeypatch, f"http://127.0.0.1:{free_port()}", hub, offline=True)
    assert_same_scorer(STTSModel.from_pretrained(load(), ADAPTER_REPO), published["a"])
    assert_same_scorer(STTSModel.from_pretrained(load(), ADAPTER_REPO, revision="v2"), published["b"])
    start = time.perf_counter()
    with pytest.raises(AdapterLoadError, match="never-pulled"):
        STTSModel.from_pretrained(load(), ADAPTER_REPO, revision="never-pulled")
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    ("repo_id", "revision", "named"),
    [("stts-org/not-on-the-hub", None, "stts-org/not-on-the-hub"), (ADAPTER_REPO, "no-such-branch", "no-such-branch")],
    ids=["unknown repo", "unknown branch"],
)
def test_what_the_server_lacks_is_refused(load, published, hub, repo_id, revision, named):
    model = load()
    before = snapshot(model)
    with pytest.raises(AdapterLoadError, match=re.escape(named)) as info:
        STTSModel.from_pretrained(model, repo_id, revision=revision)
    assert repo_id in str(info.value)
    assert_untouched(model, before)


@pytest.mark.parametrize(
    ("make_model", "named"),
    [
        (lambda: Qwen2VLForConditionalGeneration(tiny_qwen2_vl_config()), ["Qwen2VLForConditionalGeneration"]),
        (lambda: Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(hidden_size=96)), ["ViT width 96"]),
    ],
    ids=["another architecture", "another size"],
)
def test_an_adapter_for_another_base_model_is_refused_naming_both(load, olah, hub, tmp_path, make_model, named):
    repo = f"stts-org/other-base-{tmp_path.name}"
    torch.manual_seed(0)
    make_adapter(tmp_path / "other", seed=0, prune_ratio=0.5, model=make_model())
    olah.mirrors.commit(repo, tmp_path / "other")
    model = load()
    before = snapshot(model)
    with pytest.raises(AdapterLoadError) as info:
        STTSModel.from_pretrained(model, repo)
    message = str(info.value)
    for text in [*named, "Qwen2_5_VLForConditionalGeneration", "ViT width 64", repo]:
        assert text in message, (text, message)
    assert_untouched(model, before)


# --------------------------------------------------------------------------------------------- other processes
def run_in_subprocess(args, olah, tmp_path, timeout=180):
    """Run `python ARGS` with HF_ENDPOINT etc. set before huggingface_hub is imported, as a user would."""
    env = olah.hub_environment(tmp_path / "subprocess-cache")
    result = subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_cli_inspects_an_adapter_by_repo_id_on_the_server(published, hub, capsys):
    assert main(["inspect", ADAPTER_REPO, "--revision", "v2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["config"]["prune_ratio"] == 0.25
    assert summary["snapshot"] == str(hub / "models--stts-org--tiny-qwen2.5-vl-stts" / "snapshots" / published["v2"])


def test_cli_in_another_process_gets_model_and_adapter_by_repo_id(olah, published, load, tmp_path):
    """HF_ENDPOINT set before huggingface_hub is imported, as a user sets it: the model and the adapter both come
    from the server, and the units shown are the ones adapter A keeps in this process."""
    masks, picture = tmp_path / "kept.json", tmp_path / "kept.png"
    command = f"visualize --model {MODEL_REPO} --adapter {ADAPTER_REPO} --frames 4 --size 56 --no-progress"
    run_in_subprocess(
        ["-m", "stts_adapter.cli", *command.split(), "--out", str(picture), "--json", str(masks)], olah, tmp_path
    )
    assert picture.stat().st_size > 0
    cache = tmp_path / "subprocess-cache"
    assert os.listdir(cache / "models--stts-org--tiny-qwen2.5-vl" / "snapshots") == [published["model"]]
    assert os.listdir(cache / "models--stts-org--tiny-qwen2.5-vl-stts" / "snapshots") == [published["main"]]
    # The same units as adapter A keeps in this process on the same video.
    model = load()
    family = VIDEO_FAMILIES["qwen2_5_vl"]
    _, pixels = prepare_video(load_video("synthetic", 4, 56), family, model.config, 56, None)
    with torch.no_grad():
        keep = published["a"](**build_video_batch(model, family, pixels)).stts.keep_masks[0]
    shown = json.loads(masks.read_text())
    assert torch.tensor(shown["keep_masks"]).flatten(1).bool().equal(keep)


def test_push_and_pull_example_round_trips_through_the_server(tmp_path):
    executable = olah_cli()
    if executable is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    example = str(REPO_ROOT / "examples" / "push_and_pull.py")
    result = subprocess.run(
        [sys.executable, example, "--olah-cli", executable, "--workdir", str(tmp_path / "example")],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "same scorer weights: True, same kept units: True, same logits: True" in result.stdout
    assert "Pulled stts-org/tiny-qwen2.5-vl-stts@v2: prune_ratio 0.25" in result.stdout
    assert result.stdout.rstrip().endswith("Round trip OK.")
    commits = re.findall(r"/commit/([0-9a-f]{40})", result.stdout)
    assert len(commits) == 2
    assert f"resolved main to commit {commits[0]}" in result.stdout
