"""Adapter files: what save_pretrained writes, the round trip through from_pretrained, and every refusal.

A refusal must happen before the base model is touched, so each one is checked against a snapshot of the model
(modules, state dict, requires_grad, train/eval mode). Only JSON and safetensors may ever be read: pickles placed
next to the adapter are ignored and the unpickling entry points are booby-trapped while loading.
"""

import ast
import hashlib
import json
import os
import pickle
import re
import time

import huggingface_hub
import pytest
import torch
from huggingface_hub import ModelCard
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_qwen_vl import two_video_batch
from transformers import Qwen2_5_VLForConditionalGeneration

import stts_adapter
from stts_adapter import AdapterLoadError, STTSConfig, STTSModel, apply_stts
from stts_adapter.io import model_card
from stts_adapter.testing import tiny_qwen2_5_vl_config

PRUNE_LAYER = 1
CONFIG_FILE, WEIGHTS_FILE, CARD_FILE = "stts_config.json", "stts_model.safetensors", "README.md"
ADAPTER_FILES = {CONFIG_FILE, WEIGHTS_FILE, CARD_FILE}


# --------------------------------------------------------------------------------------------- helpers
def snapshot(model):
    """Everything a load could change on the base model."""
    return {
        "modules": {name: type(module) for name, module in model.named_modules()},
        "training": {name: module.training for name, module in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "state": {name: tensor.clone() for name, tensor in model.state_dict().items()},
    }


def assert_untouched(model, before):
    wrappers = [name for name, module in model.named_modules() if type(module).__name__.startswith("STTS")]
    assert not wrappers, f"a refused load left STTS modules in the base model: {wrappers}"
    assert {name: type(module) for name, module in model.named_modules()} == before["modules"]
    assert {name: module.training for name, module in model.named_modules()} == before["training"]
    assert {name: p.requires_grad for name, p in model.named_parameters()} == before["requires_grad"]
    state = model.state_dict()
    assert list(state) == list(before["state"])
    changed = [name for name in state if not torch.equal(state[name], before["state"][name])]
    assert not changed, f"a refused load changed {changed}"


def assert_same_scorer(loaded, expected) -> None:
    """The scorers of two `STTSModel`s hold equal tensors under every key."""
    state = loaded.scorer.state_dict()
    for key, tensor in expected.scorer.state_dict().items():
        assert torch.equal(state[key], tensor), key


def refuse(model, path, match, **kwargs):
    """from_pretrained must raise AdapterLoadError matching `match` and leave `model` exactly as it was."""
    before = snapshot(model)
    with pytest.raises(AdapterLoadError, match=match) as info:
        STTSModel.from_pretrained(model, str(path), **kwargs)
    assert_untouched(model, before)
    return info.value


def train_a_few_steps(stts, batch, steps=3):
    stts.train()
    optimizer = torch.optim.AdamW([p for p in stts.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        stts(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return stts.eval()


@pytest.fixture
def saved_adapter(load, tmp_path):
    """(directory, STTSModel) of a freshly initialised scorer adapter on the tiny Qwen2.5-VL."""
    torch.manual_seed(0)
    stts = apply_stts(load(), STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    directory = tmp_path / "adapter"
    stts.save_pretrained(str(directory))
    return directory, stts


def rewrite_weights(directory, tensors):
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})


class _PickleTrap:
    """Unpickling this creates the directory `path`: proof that something unpickled it."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# --------------------------------------------------------------------------------------------- what is saved
def test_save_pretrained_writes_exactly_the_three_adapter_files(saved_adapter):
    directory, _ = saved_adapter
    assert set(os.listdir(directory)) == ADAPTER_FILES
    assert all((directory / name).is_file() for name in ADAPTER_FILES)


def test_safetensors_holds_only_the_scorer_under_logical_names(saved_adapter):
    directory, stts = saved_adapter
    path = directory / WEIGHTS_FILE
    tensors = load_file(str(path))
    scorer_state = stts.scorer.state_dict()
    assert len(tensors) == len(scorer_state) > 0
    for key in tensors:
        assert key.startswith("scorer."), key
        assert not any(part in key for part in ("model.visual", "visual.", "base_layer", "base_model", "lora_")), key
    assert {key: tuple(t.shape) for key, t in tensors.items()} == {
        "scorer." + key: tuple(t.shape) for key, t in scorer_state.items()
    }
    for key, tensor in scorer_state.items():
        assert torch.equal(tensors["scorer." + key], tensor)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    assert set(metadata) == {"format", "stts_config", "stts_data_sha256"} and metadata["format"] == "pt"
    saved_config = json.loads((directory / "stts_config.json").read_text())
    assert json.loads(metadata["stts_config"]) == {**saved_config, "weights_sha256": None}  # the weights' own config
    data = path.read_bytes()[8 + int.from_bytes(path.read_bytes()[:8], "little") :]
    assert metadata["stts_data_sha256"] == saved_config["weights_sha256"] == hashlib.sha256(data).hexdigest()
    # Only the scorer: a few hundred KB at most for the tiny model, and nothing but a small header beyond the payload.
    payload = sum(t.numel() * t.element_size() for t in scorer_state.values())
    size = path.stat().st_size
    assert size <= 400_000
    assert payload <= size <= payload + 10_000
    # Nothing of the base model is in there: every saved tensor is a scorer tensor, none is a ViT or LLM weight.
    base_numel = sum(p.numel() for p in stts.base_model.parameters())
    assert sum(t.numel() for t in tensors.values()) < base_numel / 10


def test_config_records_the_base_model_and_the_library_version(saved_adapter):
    directory, stts = saved_adapter
    with open(directory / CONFIG_FILE, encoding="utf-8") as f:
        saved = json.load(f)
    vision = stts.base_model.config.vision_config
    assert saved["architecture"] == "qwen2_5_vl"
    assert saved["base_model_class"] == "Qwen2_5_VLForConditionalGeneration"
    assert saved["vision_hidden_size"] == vision.hidden_size == 64
    assert saved["num_vision_blocks"] == vision.depth == 5
    assert saved["patches_per_unit"] == vision.spatial_merge_size**2 == 4
    assert saved["stts_adapter_version"] == stts_adapter.__version__
    assert saved["prune_ratio"] == 0.5 and saved["prune_layer"] == PRUNE_LAYER and saved["method"] == "scorer"
    # The file is a complete, valid STTSConfig.
    assert STTSConfig.from_dict(saved).to_dict() == saved


def test_model_card_has_front_matter_and_a_how_to_load_snippet(saved_adapter):
    directory, _ = saved_adapter
    text = (directory / CARD_FILE).read_text(encoding="utf-8")
    assert text.startswith("---\n")
    card = ModelCard.load(str(directory / CARD_FILE))  # the Hub's own parser of the YAML front matter
    assert card.data.library_name == "stts-adapter"
    assert "stts" in card.data.tags
    section = text.split("## How to load", 1)
    assert len(section) == 2, "no 'How to load' section"
    blocks = re.findall(r"```python\n(.*?)```", section[1], flags=re.DOTALL)
    assert blocks, "no python code block under 'How to load'"
    code = blocks[0]
    assert "STTSModel.from_pretrained(" in code
    assert "Qwen2_5_VLForConditionalGeneration" in code
    ast.parse(code)  # the snippet is valid Python


def test_save_pretrained_on_a_non_main_process_writes_nothing(load, tmp_path):
    stts = apply_stts(load(), STTSConfig(prune_layer=PRUNE_LAYER))
    stts.save_pretrained(str(tmp_path / "adapter"), is_main_process=False)
    assert not (tmp_path / "adapter").exists() or not os.listdir(tmp_path / "adapter")


def test_save_pretrained_into_a_file_path_is_refused(load, tmp_path):
    stts = apply_stts(load(), STTSConfig(prune_layer=PRUNE_LAYER))
    target = tmp_path / "a_file"
    target.write_text("x")
    with pytest.raises(ValueError, match=r"\bis a file\b"):
        stts.save_pretrained(str(target))
    assert target.read_text() == "x"


# --------------------------------------------------------------------------------------------- round trip
def test_round_trip_of_a_trained_scorer_reproduces_logits_and_kept_sets(load, tmp_path):
    torch.manual_seed(0)
    model = load()
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    batch = two_video_batch(model, answers=True)
    initial_weights = {k: v.clone() for k, v in stts.scorer.state_dict().items()}
    with torch.no_grad():
        initial_scores = stts.eval()(**batch).stts.scores

    train_a_few_steps(stts, batch)
    trained_weights = stts.scorer.state_dict()
    assert any(not torch.equal(trained_weights[k], initial_weights[k]) for k in initial_weights)
    with torch.no_grad():  # inference, as the loaded (frozen) copy runs
        reference = stts(**batch)
    assert any(not torch.equal(a, b) for a, b in zip(reference.stts.scores, initial_scores))
    stts.save_pretrained(str(tmp_path / "adapter"))

    fresh = load()
    loaded = STTSModel.from_pretrained(fresh, str(tmp_path / "adapter"))
    assert loaded.base_model is fresh
    for key, tensor in loaded.scorer.state_dict().items():
        assert torch.equal(tensor, trained_weights[key]), key
    out = loaded(**batch)
    assert torch.equal(out.logits, reference.logits)
    assert len(out.stts.keep_masks) == len(reference.stts.keep_masks) == 2
    for mask, expected in zip(out.stts.keep_masks, reference.stts.keep_masks):
        assert torch.equal(mask, expected)
    assert out.stts.units_after == reference.stts.units_after
    for scores, expected in zip(out.stts.scores, reference.stts.scores):
        assert torch.equal(scores, expected)
    # The loaded config is the saved one (plus the version that saved it and the hash of its weights).
    written_at_save = ("stts_adapter_version", "weights_sha256")
    saved = {k: v for k, v in loaded.stts_config.to_dict().items() if k not in written_at_save}
    assert saved == {k: v for k, v in stts.stts_config.to_dict().items() if k not in written_at_save}
    weights = (tmp_path / "adapter" / WEIGHTS_FILE).read_bytes()
    data = weights[8 + int.from_bytes(weights[:8], "little") :]  # the tensor data, after the header
    assert loaded.stts_config.weights_sha256 == hashlib.sha256(data).hexdigest()
    assert loaded.stts_config.stts_adapter_version == stts_adapter.__version__


def test_default_load_is_for_inference(saved_adapter, load):
    directory, _ = saved_adapter
    fresh = load().train()
    loaded = STTSModel.from_pretrained(fresh, str(directory))
    assert not loaded.training
    assert not any(module.training for module in loaded.modules())
    assert not any(p.requires_grad for p in loaded.scorer.parameters())
    assert loaded.get_nb_trainable_parameters()[0] == 0


def test_is_trainable_loads_a_trainable_scorer(saved_adapter, load):
    directory, _ = saved_adapter
    fresh = load()
    loaded = STTSModel.from_pretrained(fresh, str(directory), is_trainable=True)
    assert all(p.requires_grad for p in loaded.scorer.parameters())
    trainable = {name for name, p in loaded.named_parameters() if p.requires_grad}
    assert trainable == {"scorer." + name for name, _ in loaded.scorer.named_parameters()}
    # And it does train: gradients reach the scorer, never the base model.
    batch = two_video_batch(fresh, answers=True)
    loaded.train()(**batch).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in loaded.scorer.parameters())
    assert all(p.grad is None for p in fresh.parameters())


def test_custom_scorer_size_round_trips(load, tmp_path):
    config = STTSConfig(prune_layer=PRUNE_LAYER, scorer_hidden_size=16, scorer_num_heads=2)
    stts = apply_stts(load(), config)
    stts.save_pretrained(str(tmp_path / "adapter"))
    loaded = STTSModel.from_pretrained(load(), str(tmp_path / "adapter"))
    assert loaded.scorer.hidden_size == 16 and loaded.scorer.num_heads == 2
    for key, tensor in stts.scorer.state_dict().items():
        assert torch.equal(loaded.scorer.state_dict()[key], tensor)


@pytest.mark.parametrize("method", ["random", "similarity"])
def test_training_free_methods_save_and_load_without_tensors(load, tmp_path, method):
    model = load()
    stts = apply_stts(model, STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER, method=method, seed=7))
    assert stts.scorer is None
    batch = two_video_batch(model)
    reference = stts(**batch)
    stts.save_pretrained(str(tmp_path / "adapter"))
    assert set(os.listdir(tmp_path / "adapter")) == ADAPTER_FILES
    assert load_file(str(tmp_path / "adapter" / WEIGHTS_FILE)) == {}
    with open(tmp_path / "adapter" / CONFIG_FILE, encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["method"] == method and saved["seed"] == 7

    loaded = STTSModel.from_pretrained(load(), str(tmp_path / "adapter"))
    assert loaded.scorer is None
    assert loaded.stts_config.method == method
    out = loaded(**batch)
    assert torch.equal(out.logits, reference.logits)
    for mask, expected in zip(out.stts.keep_masks, reference.stts.keep_masks):
        assert torch.equal(mask, expected)


# --------------------------------------------------------------------------------------------- mismatched base
def test_adapter_for_another_architecture_is_refused(load, tmp_path):
    stts = apply_stts(load("qwen2_vl"), STTSConfig(prune_layer=PRUNE_LAYER))
    stts.save_pretrained(str(tmp_path / "adapter"))
    error = refuse(load("qwen2_5_vl"), tmp_path / "adapter", match="Qwen2VLForConditionalGeneration")
    assert "Qwen2_5_VLForConditionalGeneration" in str(error)
    assert isinstance(error, ValueError)


@pytest.mark.parametrize("method", ["scorer", "random"])
def test_adapter_for_another_size_is_refused(load, tmp_path, method):
    """Refused from the recorded ViT width, not only through tensor shapes: a scorer-free adapter has none."""
    torch.manual_seed(0)
    narrow = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(hidden_size=32, intermediate_size=64)).eval()
    assert narrow.config.vision_config.hidden_size == 32
    stts = apply_stts(narrow, STTSConfig(prune_layer=PRUNE_LAYER, method=method))
    assert stts.stts_config.vision_hidden_size == 32
    stts.save_pretrained(str(tmp_path / "adapter"))
    error = refuse(load(), tmp_path / "adapter", match=r"(?i)(width|hidden size)\D{0,20}\b32\b")
    assert re.search(r"(?i)(width|hidden size)\D{0,20}\b64\b", str(error)), str(error)


def test_adapter_for_another_depth_is_refused(load, tmp_path):
    torch.manual_seed(0)
    deeper = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config(depth=6)).eval()
    stts = apply_stts(deeper, STTSConfig(prune_layer=PRUNE_LAYER))
    stts.save_pretrained(str(tmp_path / "adapter"))
    error = refuse(load(), tmp_path / "adapter", match=r"\b6 blocks")
    assert re.search(r"\b5 blocks", str(error)), str(error)


# --------------------------------------------------------------------------------------------- damaged weights
@pytest.mark.parametrize("damage", ["truncated", "random bytes", "empty", "pickle"])
def test_unreadable_weights_are_refused(saved_adapter, load, damage, tmp_path):
    directory, _ = saved_adapter
    path = directory / WEIGHTS_FILE
    marker = tmp_path / "unpickled"
    if damage == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif damage == "random bytes":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0)).byte().numpy())
    elif damage == "empty":
        path.write_bytes(b"")
    else:  # a torch.save pickle under the safetensors name
        torch.save({"scorer.mlp.0.weight": _PickleTrap(marker)}, str(path))
    refuse(load(), directory, match="(?i)truncated|corrupt")
    assert not marker.exists()


def _scorer_tensors(directory):
    return load_file(str(directory / WEIGHTS_FILE))


def test_missing_tensor_is_refused_naming_it(saved_adapter, load):
    directory, _ = saved_adapter
    tensors = _scorer_tensors(directory)
    del tensors["scorer.mlp.2.bias"]
    rewrite_weights(directory, tensors)
    refuse(load(), directory, match=re.escape("scorer.mlp.2.bias"))


@pytest.mark.parametrize("extra_key", ["scorer.extra.weight", "model.visual.blocks.0.attn.qkv.weight"])
def test_extra_tensor_is_refused_naming_it(saved_adapter, load, extra_key):
    directory, _ = saved_adapter
    tensors = _scorer_tensors(directory)
    tensors[extra_key] = torch.zeros(3, 3)
    rewrite_weights(directory, tensors)
    refuse(load(), directory, match=re.escape(extra_key))


def test_wrong_shape_is_refused_naming_the_key(saved_adapter, load):
    directory, _ = saved_adapter
    tensors = _scorer_tensors(directory)
    assert tensors["scorer.mlp.0.weight"].shape == (128, 128)
    tensors["scorer.mlp.0.weight"] = torch.zeros(128, 64)
    rewrite_weights(directory, tensors)
    error = refuse(load(), directory, match=re.escape("scorer.mlp.0.weight"))
    assert "128, 64" in str(error) and "128, 128" in str(error)


def test_weights_of_another_method_are_refused(saved_adapter, load):
    """Config and weights must agree: a scorer adapter with no tensors, a random adapter with tensors."""
    directory, _ = saved_adapter
    tensors = _scorer_tensors(directory)
    rewrite_weights(directory, {})
    refuse(load(), directory, match=re.escape("scorer.mlp.0.weight"))

    rewrite_weights(directory, tensors)
    config = json.loads((directory / CONFIG_FILE).read_text())
    config["method"] = "random"
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    refuse(load(), directory, match=re.escape("scorer.mlp.0.weight"))


# --------------------------------------------------------------------------------------------- damaged config
@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"\xff\xfe\x00\x81 garbage", b'{"prune_ratio": 0.5,'],
    ids=["syntax", "empty", "binary", "cut"],
)
def test_config_that_is_not_json_is_refused(saved_adapter, load, content):
    directory, _ = saved_adapter
    (directory / CONFIG_FILE).write_bytes(content)
    refuse(load(), directory, match="(?i)not valid JSON")


@pytest.mark.parametrize("values", [[1, 2], {"prune_ratio": 1.5}], ids=["not an object", "invalid value"])
def test_config_with_invalid_values_is_refused_before_touching_the_model(saved_adapter, load, values):
    directory, _ = saved_adapter
    config = json.loads((directory / CONFIG_FILE).read_text())
    (directory / CONFIG_FILE).write_text(json.dumps(values if isinstance(values, list) else {**config, **values}))
    model = load()
    before = snapshot(model)
    with pytest.raises(ValueError):
        STTSModel.from_pretrained(model, str(directory))
    assert_untouched(model, before)


def test_unknown_future_config_key_loads_with_a_warning(saved_adapter, load):
    directory, stts = saved_adapter
    config = json.loads((directory / CONFIG_FILE).read_text())
    config["a_knob_from_the_future"] = 3
    (directory / CONFIG_FILE).write_text(json.dumps(config))
    model = load()
    with pytest.warns(UserWarning, match="a_knob_from_the_future"):
        loaded = STTSModel.from_pretrained(model, str(directory))
    assert not hasattr(loaded.stts_config, "a_knob_from_the_future")
    for key, tensor in stts.scorer.state_dict().items():
        assert torch.equal(loaded.scorer.state_dict()[key], tensor)


# --------------------------------------------------------------------------------------------- wrong places
def test_directory_without_adapter_files_is_refused(load, tmp_path):
    (tmp_path / "empty").mkdir()
    refuse(load(), tmp_path / "empty", match=re.escape(CONFIG_FILE))


@pytest.mark.parametrize("missing", [CONFIG_FILE, WEIGHTS_FILE])
def test_directory_missing_one_file_is_refused_naming_it(saved_adapter, load, missing):
    directory, _ = saved_adapter
    (directory / missing).unlink()
    refuse(load(), directory, match=re.escape(missing))


@pytest.mark.parametrize("name", [CONFIG_FILE, WEIGHTS_FILE])
def test_path_to_a_file_instead_of_the_folder_is_refused(saved_adapter, load, name):
    directory, _ = saved_adapter
    refuse(load(), directory / name, match=r"(?i)\bis a file\b|not a (directory|folder)")


def test_local_path_that_does_not_exist_is_refused(load, tmp_path):
    missing = tmp_path / "no" / "such" / "adapter"
    refuse(load(), missing, match=re.escape(str(missing)))


def test_repo_id_missing_from_the_offline_cache_is_refused_fast(load, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    model = load()
    start = time.perf_counter()
    refuse(model, "some-org/not-cached-stts-adapter", match="some-org/not-cached-stts-adapter")
    assert time.perf_counter() - start < 5


# --------------------------------------------------------------------------------------------- no pickles
def test_pickles_in_the_adapter_folder_are_never_loaded(saved_adapter, load, tmp_path, monkeypatch):
    directory, stts = saved_adapter
    marker = tmp_path / "unpickled"
    for name in ("pytorch_model.bin", "adapter_model.bin", "stts_model.bin", "stts_model.pt", "training_args.bin"):
        torch.save({"scorer.mlp.0.weight": _PickleTrap(marker)}, str(directory / name))
    with open(directory / "stts_model.pkl", "wb") as f:
        pickle.dump(_PickleTrap(marker), f)
    # The trap is live: unpickling any of these files creates the marker.
    with open(directory / "stts_model.pkl", "rb") as f:
        pickle.load(f)
    assert marker.exists()
    marker.rmdir()

    def forbidden(*args, **kwargs):
        raise AssertionError("an adapter load must never unpickle anything")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(torch.serialization, "load", forbidden)
    loaded = STTSModel.from_pretrained(load(), str(directory))
    assert not marker.exists()
    for key, tensor in stts.scorer.state_dict().items():
        assert torch.equal(loaded.scorer.state_dict()[key], tensor)
    batch = two_video_batch(loaded.base_model)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, stts(**batch).logits)


# --------------------------------------------------------------------------------------------- hostile adapters
@pytest.mark.parametrize("poison", ["nan", "inf", "int", "bool", "complex"])
def test_non_finite_or_non_float_weights_are_refused_not_cast(saved_adapter, load, poison):
    directory, _ = saved_adapter
    tensors = _scorer_tensors(directory)
    name = "scorer.mlp.2.weight"
    if poison in ("nan", "inf"):
        tensors[name] = tensors[name].clone()
        tensors[name][0, 0] = float(poison)
    else:
        dtype = {"int": torch.int32, "bool": torch.bool, "complex": torch.complex64}[poison]
        tensors[name] = torch.zeros(tensors[name].shape, dtype=dtype)
    rewrite_weights(directory, tensors)
    match = "NaN or infinite" if poison in ("nan", "inf") else "non-float"
    refuse(load(), directory, match)


def test_a_config_asking_for_a_huge_scorer_is_refused_before_anything_is_allocated(saved_adapter, load):
    """The shapes come from the weights file's header and a scorer built on the meta device: a 1 KB config asking for
    an 8192-wide scorer is refused at once (it allocated 1.1 GB for 7.7 s before); beyond any real ViT, at config
    time."""
    directory, _ = saved_adapter
    config = json.loads((directory / "stts_config.json").read_text())
    (directory / "stts_config.json").write_text(json.dumps({**config, "scorer_hidden_size": 8192}))
    start = time.perf_counter()
    refuse(load(), directory, r"scorer\.mlp\.0\.weight: file \(128, 128\) vs expected \(8192, 128\)")
    assert time.perf_counter() - start < 5
    (directory / "stts_config.json").write_text(json.dumps({**config, "scorer_hidden_size": 10**9}))
    refuse(load(), directory, "scorer_hidden_size")


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, '{"a": ' * 50_000 + "1" + "}" * 50_000])
def test_a_deeply_nested_config_is_an_adapter_load_error(saved_adapter, load, content):
    directory, _ = saved_adapter
    (directory / "stts_config.json").write_text(content)
    refuse(load(), directory, r"stts_config\.json is not valid JSON \(nested too deeply\)")


HOSTILE_NAMES = [
    "org/name",
    'org/na"me',
    "org/name\n---\nlicense: evil",
    "org/name```\nimport os; os.system('x')\n```",
    "---",
    "/abs/path/with\nnewline",
    "C:\\models\\qwen",
    "日本/モデル",
]


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_the_model_card_cannot_be_injected_through_the_base_model_name(name):
    yaml = pytest.importorskip("yaml")
    config = STTSConfig(
        architecture="qwen2_5_vl", base_model_class="Qwen2_5_VLForConditionalGeneration", base_model_name_or_path=name
    )
    card = model_card(config)
    assert card.startswith("---\n") and card.count("\n---\n") == 1  # one front matter block, closed once
    front, body = card[4:].split("\n---\n", 1)
    meta = yaml.safe_load(front)
    assert set(meta) <= {"library_name", "base_model", "tags"}
    assert meta["library_name"] == "stts-adapter" and meta["tags"][-1] == "qwen2_5_vl"
    assert meta.get("base_model") == (name if name == "org/name" else None)  # only a valid Hub id goes there
    assert body.count("```") == 2  # the one code block, opened and closed
    (snippet,) = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    calls = [node for node in ast.walk(ast.parse(snippet)) if isinstance(node, ast.Call)]
    loads = [
        c for c in calls if getattr(c.func, "attr", "") == "from_pretrained" and isinstance(c.func.value, ast.Name)
    ]
    assert loads[0].args[0].value == name  # the exact name, as a string literal


def test_a_timm_adapters_card_loads_its_base_with_timm():
    config = STTSConfig(
        architecture="timm_vit",
        base_model_class="VisionTransformer",
        base_model_name_or_path="timm/vit_base_patch16_224.augreg_in21k",
    )
    (snippet,) = re.findall(r"```python\n(.*?)```", model_card(config), flags=re.S)
    assert 'timm.create_model("vit_base_patch16_224.augreg_in21k", pretrained=True)' in snippet
    assert "transformers" not in snippet
