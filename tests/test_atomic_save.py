"""save_pretrained over an existing adapter: whatever point a save is stopped at (an exception at every step, SIGKILL
at random moments), the folder loads as the old adapter or the new one, whole; a symlink planted at a target file
is replaced, never written through."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file

from stts_adapter import STTSConfig, STTSModel, apply_stts

PRUNE_LAYER = 1
FILES = ("stts_model.safetensors", "stts_config.json", "README.md")


def adapter(load, seed: int, prune_ratio: float) -> STTSModel:
    torch.manual_seed(seed)
    return apply_stts(load(), STTSConfig(prune_ratio=prune_ratio, prune_layer=PRUNE_LAYER))


def loaded_as(load, folder) -> tuple[float, dict[str, torch.Tensor]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an interrupted save is reported with a warning
        model = STTSModel.from_pretrained(load(), str(folder))
    return model.stts_config.prune_ratio, model.scorer.state_dict()


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Stop(Exception):
    pass


@pytest.mark.parametrize("where", ["fsync", "replace"])
def test_a_save_stopped_at_any_step_leaves_the_old_or_the_new_adapter_whole(load, tmp_path, monkeypatch, where):
    old, new = adapter(load, 0, 0.5), adapter(load, 1, 0.25)
    expected = {"old": (0.5, old.scorer.state_dict()), "new": (0.25, new.scorer.state_dict())}
    seen = set()
    for step in range(1, 5):
        folder = tmp_path / f"{where}-{step}"
        old.save_pretrained(folder)
        real, calls = getattr(os, where), []

        def stop_at_step(*args, real=real, calls=calls, step=step):
            calls.append(args)
            if len(calls) == step:
                raise Stop
            return real(*args)

        monkeypatch.setattr(os, where, stop_at_step)
        try:
            new.save_pretrained(folder)
        except Stop:
            pass
        finally:
            monkeypatch.setattr(os, where, real)
        ratio, state = loaded_as(load, folder)
        match = [name for name, (r, s) in expected.items() if r == ratio and same(s, state)]
        assert match, f"{where} stopped at step {step}: neither the old nor the new adapter"
        seen.add(match[0])
        assert not [name for name in os.listdir(folder) if name not in FILES], "temporary files left behind"
    assert seen == {"old", "new"}  # the stops fell before and after the point of no return


def test_a_symlink_at_a_target_file_is_replaced_not_written_through(load, tmp_path):
    folder, outside = tmp_path / "adapter", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    for name in FILES:
        (outside / name).write_text("precious")
        (folder / name).symlink_to(outside / name)
    adapter(load, 0, 0.5).save_pretrained(folder)
    assert all((outside / name).read_text() == "precious" for name in FILES)
    assert not any((folder / name).is_symlink() for name in FILES)


CHILD = """
import sys, torch
from transformers import Qwen2_5_VLForConditionalGeneration
from stts_adapter import STTSConfig, apply_stts
from stts_adapter.testing import tiny_qwen2_5_vl_config

root = sys.argv[1]
models = []
for seed, ratio in ((0, 0.5), (1, 0.25)):
    torch.manual_seed(seed)
    base = Qwen2_5_VLForConditionalGeneration(tiny_qwen2_5_vl_config())
    model = apply_stts(base, STTSConfig(prune_ratio=ratio, prune_layer=1))
    model.save_pretrained(f"{root}/reference-{seed}")
    models.append(model)
models[0].save_pretrained(f"{root}/target")
print("ready", flush=True)
while True:
    for model in models:
        model.save_pretrained(f"{root}/target")
"""


def test_a_saving_process_killed_at_random_moments_leaves_a_whole_adapter(load, tmp_path):
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(CHILD))
    generator = random.Random(0)
    references = None
    for kill in range(4):
        root = tmp_path / f"run-{kill}"
        root.mkdir()
        child = subprocess.Popen([sys.executable, str(script), str(root)], stdout=subprocess.PIPE, text=True)
        try:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(generator.uniform(0.05, 0.6))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        if references is None:
            references = [
                (ratio, {k[len("scorer.") :]: v for k, v in load_file(root / f"reference-{seed}" / FILES[0]).items()})
                for seed, ratio in ((0, 0.5), (1, 0.25))
            ]
        ratio, state = loaded_as(load, root / "target")
        assert any(r == ratio and same(s, state) for r, s in references), f"kill {kill}: a mixed or broken adapter"
