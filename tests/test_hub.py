"""The Hub side of adapters, without a network: pulls resolve from a hand-made offline cache, pushes go to a fake HfApi.

huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE from the environment once, at import, into
`huggingface_hub.constants`; `hf_hub_download` then reads `constants.HF_HUB_CACHE` at every call. So setting the
environment variable inside a test does nothing (checked: the file is not found); the tests patch the constants.
"""

import json
import os
import re
import shutil
import time
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard, RepoUrl
from safetensors.torch import load_file
from test_adapter_io import assert_same_scorer, assert_untouched, snapshot
from test_qwen_vl import two_video_batch

import stts_adapter.io
from stts_adapter import AdapterLoadError, STTSConfig, STTSModel, apply_stts

PRUNE_LAYER = 1
REPO_ID = "stts-org/tiny-qwen2.5-vl-stts"
ADAPTER_FILES = {"stts_config.json", "stts_model.safetensors", "README.md"}
COMMIT_MAIN, COMMIT_V2 = "1" * 8 + "a" * 32, "2" * 8 + "b" * 32


# --------------------------------------------------------------------------------------------- offline cache
@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache in tmp_path, used offline by hf_hub_download."""
    root = tmp_path / "hub-cache"
    root.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(root))  # for completeness; read only at import
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return root


def add_to_cache(root, repo_id, refs, snapshots):
    """Lay out a repo as huggingface_hub caches it: refs/<branch> holds a commit, snapshots/<commit>/<files>."""
    org, name = repo_id.split("/")
    repo = root / f"models--{org}--{name}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref, commit in refs.items():
        (repo / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    for commit, source in snapshots.items():
        shutil.copytree(source, repo / "snapshots" / commit)
    return repo


def make_adapter(load, directory, seed, prune_ratio, family="qwen2_5_vl"):
    torch.manual_seed(seed)
    model = load(family)
    stts = apply_stts(model, STTSConfig(prune_ratio=prune_ratio, prune_layer=PRUNE_LAYER))
    stts.save_pretrained(str(directory))
    return stts


@pytest.fixture
def cached_repo(load, hub_cache, tmp_path):
    """REPO_ID in the cache: main -> adapter A (prune_ratio 0.5), branch v2 -> adapter B (0.25, other weights)."""
    adapter_a = make_adapter(load, tmp_path / "a", seed=0, prune_ratio=0.5)
    adapter_b = make_adapter(load, tmp_path / "b", seed=1, prune_ratio=0.25)
    differing = [
        k for k, v in adapter_a.scorer.state_dict().items() if not torch.equal(v, adapter_b.scorer.state_dict()[k])
    ]
    assert differing  # the two adapters are distinguishable by their weights
    add_to_cache(
        hub_cache,
        REPO_ID,
        refs={"main": COMMIT_MAIN, "v2": COMMIT_V2},
        snapshots={COMMIT_MAIN: tmp_path / "a", COMMIT_V2: tmp_path / "b"},
    )
    return adapter_a, adapter_b


def test_repo_id_resolves_from_the_offline_cache(load, cached_repo, hub_cache, downloads):
    adapter_a, _ = cached_repo
    assert not os.path.exists(REPO_ID)  # not a local folder: it must come from the cache
    model = load()
    loaded = STTSModel.from_pretrained(model, REPO_ID)
    assert loaded.stts_config.prune_ratio == 0.5
    assert_same_scorer(loaded, adapter_a)
    assert sorted(os.path.basename(p) for p in downloads) == ["stts_config.json", "stts_model.safetensors"]
    snapshot = hub_cache / "models--stts-org--tiny-qwen2.5-vl-stts" / "snapshots" / COMMIT_MAIN
    assert all(os.path.dirname(p) == str(snapshot) for p in downloads)
    batch = two_video_batch(model)
    with torch.no_grad():
        expected = adapter_a.eval()(**batch)
        out = loaded(**batch)
    assert torch.equal(out.logits, expected.logits)
    for mask, reference in zip(out.stts.keep_masks, expected.stts.keep_masks):
        assert torch.equal(mask, reference)


@pytest.mark.parametrize(
    ("revision", "expected_index", "prune_ratio"),
    [("main", 0, 0.5), ("v2", 1, 0.25), (COMMIT_MAIN, 0, 0.5), (COMMIT_V2, 1, 0.25)],
    ids=["branch main", "branch v2", "commit of main", "commit of v2"],
)
def test_revision_selects_a_branch_or_a_commit(load, cached_repo, revision, expected_index, prune_ratio, downloads):
    loaded = STTSModel.from_pretrained(load(), REPO_ID, revision=revision)
    assert loaded.stts_config.prune_ratio == prune_ratio
    assert_same_scorer(loaded, cached_repo[expected_index])
    commit = (COMMIT_MAIN, COMMIT_V2)[expected_index]
    assert all(f"{os.sep}snapshots{os.sep}{commit}{os.sep}" in p for p in downloads)


@pytest.mark.parametrize(
    ("repo_id", "revision"),
    [
        ("stts-org/not-in-the-cache", None),
        (REPO_ID, "no-such-branch"),
        (REPO_ID, "f" * 40),  # a commit that is not cached
    ],
    ids=["unknown repo", "unknown branch", "unknown commit"],
)
def test_what_the_offline_cache_lacks_is_refused_fast(load, cached_repo, repo_id, revision):
    model = load()
    before = snapshot(model)
    start = time.perf_counter()
    with pytest.raises(AdapterLoadError, match=re.escape(repo_id)) as info:
        STTSModel.from_pretrained(model, repo_id, revision=revision)
    assert time.perf_counter() - start < 5
    if revision is not None:
        assert revision in str(info.value)
    assert_untouched(model, before)


def test_cached_snapshot_without_weights_is_refused(load, hub_cache, tmp_path):
    make_adapter(load, tmp_path / "a", seed=0, prune_ratio=0.5)
    (tmp_path / "a" / "stts_model.safetensors").unlink()
    add_to_cache(hub_cache, REPO_ID, refs={"main": COMMIT_MAIN}, snapshots={COMMIT_MAIN: tmp_path / "a"})
    model = load()
    before = snapshot(model)
    with pytest.raises(AdapterLoadError, match=re.escape("stts_model.safetensors")):
        STTSModel.from_pretrained(model, REPO_ID)
    assert_untouched(model, before)


def test_cached_adapter_for_another_architecture_is_refused(load, hub_cache, tmp_path):
    make_adapter(load, tmp_path / "a", seed=0, prune_ratio=0.5, family="qwen2_vl")
    add_to_cache(hub_cache, REPO_ID, refs={"main": COMMIT_MAIN}, snapshots={COMMIT_MAIN: tmp_path / "a"})
    model = load()
    before = snapshot(model)
    with pytest.raises(AdapterLoadError, match="Qwen2VLForConditionalGeneration") as info:
        STTSModel.from_pretrained(model, REPO_ID)
    assert "Qwen2_5_VLForConditionalGeneration" in str(info.value) and REPO_ID in str(info.value)
    assert_untouched(model, before)


# --------------------------------------------------------------------------------------------- push
class FakeHub:
    """Records HfApi calls and behaves like the Hub where it matters: a repo must exist to be uploaded to, and a
    commit can only go to an existing branch (upload_folder does not create branches; the CLI and transformers'
    push_to_hub call create_branch first)."""

    user = "fake-user"

    def __init__(self, uploads_dir):
        self.uploads_dir = uploads_dir
        self.calls = []  # (method, kwargs)
        self.repos = {}  # repo_id -> set of branches
        self.uploads = []  # {"files": set, "dir": copied folder, "folder_path": original path}
        hub = self

        class FakeHfApi:
            def __init__(self, token=None, **kwargs):
                hub.calls.append(("__init__", {"token": token, **kwargs}))

            def create_repo(self, repo_id, *, token=None, private=None, repo_type=None, exist_ok=False, **kwargs):
                hub.calls.append(
                    (
                        "create_repo",
                        {
                            "repo_id": repo_id,
                            "token": token,
                            "private": private,
                            "repo_type": repo_type,
                            "exist_ok": exist_ok,
                            **kwargs,
                        },
                    )
                )
                full_id = repo_id if "/" in repo_id else f"{hub.user}/{repo_id}"
                if full_id in hub.repos and not exist_ok:
                    raise RuntimeError(f"409 Conflict: {full_id} already exists")
                hub.repos.setdefault(full_id, {"main"})
                return RepoUrl(f"https://huggingface.co/{full_id}")

            def create_branch(self, repo_id, *, branch, revision=None, token=None, repo_type=None, exist_ok=False):
                hub.calls.append(("create_branch", {"repo_id": repo_id, "branch": branch, "exist_ok": exist_ok}))
                if repo_id not in hub.repos:
                    raise RuntimeError(f"404 Repository Not Found: {repo_id}")
                if branch in hub.repos[repo_id] and not exist_ok:
                    raise RuntimeError(f"409 Conflict: branch {branch} exists")
                hub.repos[repo_id].add(branch)

            def upload_folder(
                self, *, repo_id, folder_path, commit_message=None, revision=None, create_pr=None, **kwargs
            ):
                hub.calls.append(
                    (
                        "upload_folder",
                        {
                            "repo_id": repo_id,
                            "folder_path": folder_path,
                            "commit_message": commit_message,
                            "revision": revision,
                            "create_pr": create_pr,
                            **kwargs,
                        },
                    )
                )
                if create_pr and revision is not None:
                    raise ValueError("create_pr=True and revision cannot be combined (huggingface_hub 2.x)")
                if repo_id not in hub.repos:
                    raise RuntimeError(f"404 Repository Not Found: {repo_id}")
                if revision is not None and not revision.startswith("refs/pr/") and revision not in hub.repos[repo_id]:
                    raise RuntimeError(f"404 Revision Not Found: Invalid rev id: {revision}")
                copy = hub.uploads_dir / f"upload-{len(hub.uploads)}"
                shutil.copytree(folder_path, copy)
                hub.uploads.append({"files": set(os.listdir(folder_path)), "dir": copy, "folder_path": folder_path})
                return SimpleNamespace(
                    commit_url=f"https://huggingface.co/{repo_id}/commit/{'c' * 40}", repo_id=repo_id
                )

        self.HfApi = FakeHfApi

    def called(self, method):
        return [kwargs for name, kwargs in self.calls if name == method]


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    hub = FakeHub(tmp_path / "uploads")
    hub.uploads_dir.mkdir()
    monkeypatch.setattr(stts_adapter.io, "HfApi", hub.HfApi)
    return hub


BASE_ID = "Qwen/Qwen2.5-VL-3B-Instruct"


@pytest.fixture
def named_stts(load):
    """An STTS model whose base model came 'from the Hub' (its config names a Hub id)."""
    torch.manual_seed(0)
    model = load()
    model.config._name_or_path = BASE_ID
    return apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))


def test_push_to_hub_uploads_exactly_the_adapter(named_stts, fake_hub, load):
    result = named_stts.push_to_hub(
        "me/tiny-stts", private=True, token="hf_fake_token", commit_message="Add STTS adapter"
    )
    assert fake_hub.called("__init__") == [{"token": "hf_fake_token"}]
    (create,) = fake_hub.called("create_repo")
    assert create["repo_id"] == "me/tiny-stts" and create["exist_ok"] is True and create["private"] is True
    (upload,) = fake_hub.called("upload_folder")
    assert upload["repo_id"] == "me/tiny-stts"
    assert upload["commit_message"] == "Add STTS adapter"
    assert upload["revision"] is None and not upload["create_pr"]
    assert upload.get("path_in_repo") in (None, "", ".")
    assert result.commit_url.startswith("https://huggingface.co/me/tiny-stts/commit/")

    (uploaded,) = fake_hub.uploads
    assert uploaded["files"] == ADAPTER_FILES
    assert not os.path.exists(uploaded["folder_path"])  # the temporary folder is cleaned up
    folder = uploaded["dir"]
    card = ModelCard.load(str(folder / "README.md"))
    assert card.data.base_model == BASE_ID
    assert card.data.library_name == "stts-adapter" and "stts" in card.data.tags
    assert f'from_pretrained("{BASE_ID}")' in card.text
    tensors = load_file(str(folder / "stts_model.safetensors"))
    assert set(tensors) == {"scorer." + k for k in named_stts.scorer.state_dict()}
    for key, tensor in named_stts.scorer.state_dict().items():
        assert torch.equal(tensors["scorer." + key], tensor)
    config = json.loads((folder / "stts_config.json").read_text())
    assert config["base_model_name_or_path"] == BASE_ID
    assert config["base_model_class"] == "Qwen2_5_VLForConditionalGeneration"
    # What was pushed loads back onto the base model.
    loaded = STTSModel.from_pretrained(load(), str(folder))
    assert_same_scorer(loaded, named_stts)


def test_push_to_hub_defaults_and_an_existing_repo(named_stts, fake_hub):
    named_stts.push_to_hub("me/tiny-stts")
    named_stts.push_to_hub("me/tiny-stts")  # the repo exists now: exist_ok makes this a plain second commit
    creates, uploads = fake_hub.called("create_repo"), fake_hub.called("upload_folder")
    assert len(creates) == len(uploads) == 2
    assert all(c["exist_ok"] is True and c["private"] is None for c in creates)  # never flips an existing repo
    assert all(u["revision"] is None and u["commit_message"] for u in uploads)
    assert all(up["files"] == ADAPTER_FILES for up in fake_hub.uploads)


def test_push_to_hub_with_a_bare_name_uploads_to_the_namespaced_repo(named_stts, fake_hub):
    named_stts.push_to_hub("tiny-stts")
    (upload,) = fake_hub.called("upload_folder")
    assert upload["repo_id"] == f"{FakeHub.user}/tiny-stts"


def test_push_to_hub_to_an_existing_branch_and_as_a_pull_request(named_stts, fake_hub):
    fake_hub.repos["me/tiny-stts"] = {"main", "dev"}
    named_stts.push_to_hub("me/tiny-stts", revision="dev", commit_message="to dev")
    named_stts.push_to_hub("me/tiny-stts", create_pr=True)
    to_dev, as_pr = fake_hub.called("upload_folder")
    assert to_dev["revision"] == "dev" and to_dev["commit_message"] == "to dev" and not to_dev["create_pr"]
    assert as_pr["create_pr"] is True and as_pr["revision"] is None
    assert [up["files"] for up in fake_hub.uploads] == [ADAPTER_FILES, ADAPTER_FILES]


def test_push_to_hub_to_a_new_branch_creates_it(named_stts, fake_hub):
    """`revision` is documented as the branch to push to; on the Hub a commit to a missing branch is a 404, so the
    branch has to be created first (as `hf upload` and transformers' push_to_hub do)."""
    named_stts.push_to_hub("me/tiny-stts", revision="v2")
    (upload,) = fake_hub.called("upload_folder")
    assert upload["revision"] == "v2"
    assert "v2" in fake_hub.repos["me/tiny-stts"]
    assert [up["files"] for up in fake_hub.uploads] == [ADAPTER_FILES]


def test_save_pretrained_takes_peft_and_transformers_keywords(named_stts, fake_hub, tmp_path):
    named_stts.save_pretrained(tmp_path / "a", safe_serialization=True, max_shard_size="5GB", is_main_process=True)
    assert set(os.listdir(tmp_path / "a")) == ADAPTER_FILES
    named_stts.save_pretrained(tmp_path / "not-main", is_main_process=False)
    assert not (tmp_path / "not-main").exists()
    with pytest.raises(ValueError, match="safetensors only"):
        named_stts.save_pretrained(tmp_path / "b", safe_serialization=False)
    with pytest.raises(TypeError, match="selected_adapters"):
        named_stts.save_pretrained(tmp_path / "c", selected_adapters=["default"])
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['shard'\\]"):
        named_stts.save_pretrained(tmp_path / "d", shard=True)
    with pytest.raises(TypeError, match="push_to_hub=True"):
        named_stts.save_pretrained(tmp_path / "e", repo_id="me/x")
    assert not any((tmp_path / name).exists() for name in "bcde")  # refused before anything is written

    named_stts.save_pretrained(
        tmp_path / "tiny-stts", push_to_hub=True, token="hf_fake", private=True, commit_message="first"
    )
    (create,) = fake_hub.called("create_repo")
    assert create["repo_id"] == "tiny-stts" and create["private"] is True  # the folder's name, as transformers
    (upload,) = fake_hub.called("upload_folder")
    assert upload["repo_id"] == f"{fake_hub.user}/tiny-stts" and upload["commit_message"] == "first"
    assert fake_hub.uploads[0]["files"] == ADAPTER_FILES
    named_stts.save_pretrained(tmp_path / "f", push_to_hub=True, repo_id="me/other", revision="dev")
    assert fake_hub.called("upload_folder")[-1]["repo_id"] == "me/other"
    assert fake_hub.called("upload_folder")[-1]["revision"] == "dev"
