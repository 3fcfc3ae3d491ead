"""Adapters from a stranger: every malformed one is an `AdapterLoadError`, raised before the model is touched, before
any size it claims is allocated, and without hanging on whatever sits where a file should be.

Each case writes one defect into a freshly saved adapter (the config file, the weights' header or data, or what is
at a file's path) and checks the refusal against a snapshot of the model (`test_adapter_io.refuse`).
"""

import contextlib
import copy
import json
import math
import os
import re
import signal
import struct
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_adapter_io import refuse

import stts_adapter.scorer
from stts_adapter import STTSConfig, STTSModel, apply_stts

PRUNE_LAYER = 1
CONFIG_FILE, WEIGHTS_FILE = "stts_config.json", "stts_model.safetensors"


@pytest.fixture
def adapter(load, tmp_path):
    """The folder of a freshly saved scorer adapter on the tiny Qwen2.5-VL."""
    torch.manual_seed(0)
    stts = apply_stts(load(), STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER))
    stts.save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "adapter"


@contextlib.contextmanager
def deadline(seconds):
    """Fail instead of hanging: SIGALRM interrupts a blocking system call (e.g. opening a FIFO) with an error."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def edit_config(folder, **changes):
    """Change fields of the saved config file (its weights hash still matches: the edit is honoured, then refused)."""
    values = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**values, **changes}))


def safetensors_bytes(header, data=b"", length=None):
    """A safetensors file from a header (a dict, or raw bytes) and data, with an optional false length field."""
    encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(encoded) if length is None else length) + encoded + data


def header_of(tensors):
    """The header safetensors would write for `tensors`, and their data."""
    header, chunks, offset = {}, [], 0
    for name, tensor in tensors.items():
        data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": "F32", "shape": list(tensor.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    return header, b"".join(chunks)


# --------------------------------------------------------------------------------------------- the config file
DEEP = "[" * 100_000 + "]" * 100_000
CONFIG_TEXTS = {
    "deeply nested": '{"prune_ratio": 0.5, "x": ' + DEEP + "}",
    "NaN literal": '{"prune_ratio": NaN}',
    "Infinity literal": '{"prune_ratio": 0.5, "aux_loss_weight": Infinity}',
    "duplicate keys": '{"prune_ratio": 0.5, "prune_ratio": 0.9}',
    "a list": "[0.5, 1]",
    "a string": '"prune_ratio"',
    "null": "null",
    "5000-digit integer": '{"prune_layer": ' + "9" * 5000 + "}",
}


@pytest.mark.parametrize("text", CONFIG_TEXTS.values(), ids=CONFIG_TEXTS.keys())
def test_a_config_file_that_is_not_a_strict_json_object_is_refused(adapter, load, text):
    (adapter / CONFIG_FILE).write_text(text)
    refuse(load(), adapter, match=re.escape(CONFIG_FILE))


CONFIG_VALUES = {
    "prune_ratio as a string": {"prune_ratio": "0.5"},
    "scorer_hidden_size as a float": {"scorer_hidden_size": 16.0},
    "keep_first_frame as 1": {"keep_first_frame": 1},
    "architecture as a number": {"architecture": 5},
    "base_model_name_or_path as a list": {"base_model_name_or_path": ["Qwen/Qwen2.5-VL-3B-Instruct"]},
    "vision_hidden_size as a string": {"vision_hidden_size": "64"},
    "weights_sha256 as a number": {"weights_sha256": 123},
    "weights_sha256 not hex": {"weights_sha256": "z" * 64},
    "scorer_hidden_size 1e12": {"scorer_hidden_size": 10**12},
    "scorer_num_heads 4096": {"scorer_num_heads": 4096},
    "seed 2**64": {"seed": 2**64},
    "seed -1": {"seed": -1},
    "bias_min 1e-46": {"bias_min": 1e-46},
    "prune_layer 1e30": {"prune_layer": 10**30},
    "prune_layer past this model's blocks": {"prune_layer": 4},
    "heads that do not divide the ViT width": {"scorer_num_heads": 3},
}


@pytest.mark.parametrize("changes", CONFIG_VALUES.values(), ids=CONFIG_VALUES.keys())
def test_a_config_with_mistyped_invalid_or_absurd_values_is_refused_naming_the_field(adapter, load, changes):
    edit_config(adapter, **changes)
    refuse(load(), adapter, match=rf"\b{next(iter(changes))}=")


@pytest.mark.parametrize("width", [8192, 65536])
def test_a_config_asking_for_a_huge_scorer_is_refused_before_anything_is_allocated(adapter, load, monkeypatch, width):
    """A 1 KB config asking for an 8192-wide scorer (the largest size allowed: 65536, ~17 GB) beside the weights of a
    128-wide one is refused at once, from the header's shapes: no scorer is built except on the meta device."""
    built = []
    real_init = stts_adapter.scorer.STTSScorer.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        built.append(self.mlp[0].weight.device.type)

    monkeypatch.setattr(stts_adapter.scorer.STTSScorer, "__init__", spy)
    edit_config(adapter, scorer_hidden_size=width)
    start = time.perf_counter()
    refuse(load(), adapter, match=rf"scorer\.mlp\.0\.weight: file \(128, 128\) vs expected \({width}, 128\)")
    assert time.perf_counter() - start < 2
    assert built and set(built) == {"meta"}


@pytest.mark.parametrize("where", [CONFIG_FILE, WEIGHTS_FILE])
@pytest.mark.parametrize("what", ["fifo", "/dev/zero", "folder"])
def test_something_other_than_a_regular_file_is_refused_without_hanging(adapter, load, tmp_path, where, what):
    path = adapter / where
    path.unlink()
    if what == "fifo":
        os.mkfifo(path)
    elif what == "folder":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    with deadline(10):
        refuse(load(), adapter, match="not a regular file")


def test_a_config_file_of_megabytes_is_refused_unread(adapter, load):
    with open(adapter / CONFIG_FILE, "a") as f:
        f.write(" " * (2 << 20))
    refuse(load(), adapter, match="larger than")


@pytest.mark.parametrize("kept", [["README.md"], ["README.md", CONFIG_FILE]])
def test_a_folder_with_a_model_card_but_not_the_adapter_files_is_refused(adapter, load, kept):
    for name in os.listdir(adapter):
        if name not in kept:
            os.remove(adapter / name)
    missing = CONFIG_FILE if CONFIG_FILE not in kept else WEIGHTS_FILE
    refuse(load(), adapter, match=re.escape(missing))


# --------------------------------------------------------------------------------------------- the weights
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_or_infinite_weights_are_refused(adapter, load, value):
    tensors = load_file(str(adapter / WEIGHTS_FILE))
    tensors["scorer.mlp.2.weight"][3, 5] = value
    save_file(tensors, str(adapter / WEIGHTS_FILE))
    refuse(load(), adapter, match=r"NaN or infinite values in \['scorer\.mlp\.2\.weight'\]")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.float8_e4m3fn])
def test_weights_of_a_non_float_dtype_are_refused_not_cast(adapter, load, dtype):
    tensors = load_file(str(adapter / WEIGHTS_FILE))
    tensors["scorer.mlp.0.bias"] = torch.ones(tensors["scorer.mlp.0.bias"].shape, dtype=dtype)
    save_file(tensors, str(adapter / WEIGHTS_FILE))
    refuse(load(), adapter, match=r"non-float dtypes.*scorer\.mlp\.0\.bias.*refused, not cast")


def lying_headers(header, data):
    """Headers that do not describe the data beside them."""
    name = "scorer.mlp.0.weight"
    huge = {**header, name: {**header[name], "shape": [2**31, 2**31]}}
    fewer_bytes = copy.deepcopy(header)
    fewer_bytes[name]["data_offsets"][1] -= 4  # and every later range 4 bytes earlier: the ranges still tile the data
    for entry in fewer_bytes.values():
        if entry["data_offsets"][0] > header[name]["data_offsets"][0]:
            entry["data_offsets"] = [offset - 4 for offset in entry["data_offsets"]]
    overlapping = copy.deepcopy(header)
    overlapping[name]["data_offsets"] = [o + 8 for o in overlapping[name]["data_offsets"]]
    duplicate = json.dumps(header)[:-1] + ", " + json.dumps({name: header[name]})[1:]
    return {
        "a huge shape": safetensors_bytes(huge, data),
        "100000 dimensions": safetensors_bytes({**header, name: {**header[name], "shape": [1] * 100_000}}, data),
        "fewer bytes than its shape": safetensors_bytes(fewer_bytes, data[:-4]),
        "overlapping ranges": safetensors_bytes(overlapping, data),
        "more data than it describes": safetensors_bytes(header, data + b"\x00" * 4096),
        "less data than it describes": safetensors_bytes(header, data[:100]),
        "a huge header length": safetensors_bytes(header, data, length=2**62),
        "a header length past the end": safetensors_bytes(header, data, length=len(json.dumps(header)) + 50),
        "duplicate tensor names": safetensors_bytes(duplicate.encode(), data),
        "metadata that is not strings": safetensors_bytes({**header, "__metadata__": {"format": 1}}, data),
        "an entry without offsets": safetensors_bytes({**header, name: {"dtype": "F32", "shape": [1]}}, data),
        "a negative dimension": safetensors_bytes({**header, name: {**header[name], "shape": [-128, -128]}}, data),
        "a header that is a list": safetensors_bytes(b"[1, 2, 3]", data),
        "seven bytes": b"\x00" * 7,
    }


DAMAGED = "is not a valid safetensors file"
NOT_JSON = "The safetensors header of .* is not valid JSON"
LIES = {  # what each refusal says
    "a huge shape": re.escape("scorer.mlp.0.weight: file (2147483648, 2147483648) vs expected (128, 128)"),
    "100000 dimensions": re.escape("scorer.mlp.0.weight: file (1, 1, 1, 1, 1, 1, 1, 1, ... (100000 dimensions))"),
    "fewer bytes than its shape": DAMAGED + re.escape(" (its header gives scorer.mlp.0.weight 65532 bytes"),
    "overlapping ranges": DAMAGED + r" \(its header's byte ranges overlap or leave gaps",
    "more data than it describes": DAMAGED + r" \(its header describes \d+ bytes of tensor data, but the file holds",
    "less data than it describes": DAMAGED + r" \(its header describes \d+ bytes of tensor data, but the file holds",
    "a huge header length": DAMAGED + r" \(its header claims 4611686018427387904 bytes",
    "a header length past the end": NOT_JSON,
    "duplicate tensor names": NOT_JSON + re.escape(" (duplicate keys ['scorer.mlp.0.weight'])"),
    "metadata that is not strings": DAMAGED + r" \(its __metadata__ is not an object of strings",
    "an entry without offsets": DAMAGED + r" \(its header entry for 'scorer.mlp.0.weight' is malformed",
    "a negative dimension": DAMAGED + r" \(its header entry for 'scorer.mlp.0.weight' is malformed",
    "a header that is a list": DAMAGED + r" \(its header is not a JSON object",
    "seven bytes": DAMAGED + r" \(it has 7 bytes",
}


@pytest.mark.parametrize("case", LIES)
def test_a_weights_header_that_lies_is_refused(adapter, load, case):
    header, data = header_of(load_file(str(adapter / WEIGHTS_FILE)))
    (adapter / WEIGHTS_FILE).write_bytes(lying_headers(header, data)[case])
    start = time.perf_counter()
    error = refuse(load(), adapter, match=LIES[case])
    assert time.perf_counter() - start < 2
    assert len(str(error)) < 2000


def test_tensor_data_changed_since_the_save_is_refused(adapter, load):
    """One bit of a weight flipped (a damaged disk or download, or an edit that kept the header): the data no longer
    matches the sha256 the header states."""
    content = bytearray((adapter / WEIGHTS_FILE).read_bytes())
    content[-3] ^= 0x01
    (adapter / WEIGHTS_FILE).write_bytes(bytes(content))
    refuse(load(), adapter, match="its tensor data does not match the sha256 its header states")


def test_thousands_of_unexpected_tensors_are_named_in_a_short_message(adapter, load):
    tensors = load_file(str(adapter / WEIGHTS_FILE))
    tensors.update({f"scorer.extra.{'x' * 300}.{i}": torch.zeros(1) for i in range(5000)})
    save_file(tensors, str(adapter / WEIGHTS_FILE))
    error = refuse(load(), adapter, match="and 4990 more")
    assert len(str(error)) < 5000


# --------------------------------------------------------------------------------------------- the weights' own config
def write_weights_with_config(folder, embedded_config_text):
    """Valid weights carrying `embedded_config_text` as their config; the config file's hash no longer matches."""
    save_file(
        load_file(str(folder / WEIGHTS_FILE)),
        str(folder / WEIGHTS_FILE),
        metadata={"format": "pt", "stts_config": embedded_config_text},
    )


@pytest.mark.parametrize(
    "embedded",
    ["{not json", '{"prune_ratio": NaN}', "[]", json.dumps({"scorer_hidden_size": 10**9})],
    ids=["not json", "NaN", "a list", "absurd size"],
)
def test_a_bad_config_inside_the_weights_is_refused_when_it_is_the_one_used(adapter, load, embedded):
    write_weights_with_config(adapter, embedded)
    refuse(load(), adapter, match=re.escape(f"The config inside {adapter / WEIGHTS_FILE}"))


def test_weights_with_an_embedded_config_for_another_model_are_refused_naming_it(adapter, load):
    values = json.loads((adapter / CONFIG_FILE).read_text())
    del values["weights_sha256"]
    write_weights_with_config(adapter, json.dumps({**values, "vision_hidden_size": 32}))
    with pytest.warns(UserWarning, match="does not belong"):
        refuse(load(), adapter, match=r"ViT width 32")


def test_a_refused_adapter_leaves_a_model_that_still_loads_a_good_one(adapter, load, tmp_path):
    """After a refusal the same model object takes a valid adapter: nothing of the failed load is left on it."""
    model = load()
    good = tmp_path / "good"
    STTSModel.from_pretrained(model, str(adapter)).save_pretrained(str(good))
    model = load()
    edit_config(adapter, scorer_num_heads=3)
    refuse(model, adapter, match="scorer_num_heads")
    loaded = STTSModel.from_pretrained(model, str(good))
    assert loaded.base_model is model and loaded.scorer is not None
