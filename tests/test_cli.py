"""The `stts-adapter` command line: inspect, bench and visualize, run through `main([...])` on tiny models saved to
tmp_path (and once as `python -m stts_adapter.cli`). Hub repo ids come from a hand-made offline cache here; the
loopback Hub server is exercised in test_hub_server.py."""

import json
import math
import os
import shutil
import subprocess
import sys
import warnings

import huggingface_hub
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import SiglipVisionConfig, SiglipVisionModel

from stts_adapter import STTSConfig, apply_stts, prepare_inputs
from stts_adapter.cli import (
    PRUNED_GREY,
    VIDEO_FAMILIES,
    build_video_batch,
    kept_pixels,
    load_processor,
    load_video,
    main,
    prepare_video,
    processor_normalization,
    render_kept_units,
)
from stts_adapter.processing import decode_video_files
from stts_adapter.testing import moving_square_video
from stts_adapter.testing.common import write_video_file

PRUNE_LAYER = 1
FAMILIES = sorted(VIDEO_FAMILIES)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """`model_dir(family)` -> a folder holding the family's tiny random model (saved once per session)."""
    folders = {}

    def get(family: str):
        if family not in folders:
            case = VIDEO_FAMILIES[family].load_case()
            torch.manual_seed(0)
            folders[family] = tmp_path_factory.mktemp(f"cli-{family}")
            case.model_class(case.make_config()).save_pretrained(folders[family])
        return folders[family]

    return get


def load_tiny(model_dir, family):
    return VIDEO_FAMILIES[family].load_case().model_class.from_pretrained(model_dir(family)).eval()


@pytest.fixture
def adapter_dir(model_dir, tmp_path):
    """A scorer adapter (prune ratio 0.25) for the tiny Qwen2.5-VL; returns (folder, STTSModel)."""
    torch.manual_seed(0)
    stts = apply_stts(load_tiny(model_dir, "qwen2_5_vl"), STTSConfig(prune_ratio=0.25, prune_layer=PRUNE_LAYER))
    stts.save_pretrained(str(tmp_path / "adapter"))
    return tmp_path / "adapter", stts


def run(capsys, *argv):
    """(exit status, stdout, stderr) of `stts-adapter ARGV`."""
    status = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def expected_units(family, config, frames, height, width, prune_ratio):
    """(units, kept units) of one video, computed from the family's case: floor(ratio x units) pruned, never from
    the first frame / temporal slot."""
    slots, per_slot = VIDEO_FAMILIES[family].load_case().units(config, frames, height, width)
    units = slots * per_slot
    return units, units - min(math.floor(prune_ratio * units + 1e-9), units - per_slot)


# --------------------------------------------------------------------------------------------- inspect
def test_inspect_shows_config_base_model_and_sizes(adapter_dir, capsys):
    folder, stts = adapter_dir
    status, out, _ = run(capsys, "inspect", folder)
    assert status == 0
    parameters = sum(p.numel() for p in stts.scorer.parameters())
    for text in [
        "Qwen2_5_VLForConditionalGeneration (family qwen2_5_vl)",
        "width 64, 5 blocks, 4 patches per unit",
        "prune_ratio      0.25",
        f"prune_layer      {PRUNE_LAYER} (scores ViT block {PRUNE_LAYER}, prunes from block {PRUNE_LAYER + 2} on)",
        "method           scorer",
        f"{parameters:,d} parameters",
        "float32",
        f"Qwen2_5_VLForConditionalGeneration.from_pretrained({stts.stts_config.base_model_name_or_path!r}), "
        f"{str(folder)!r})",
    ]:
        assert text in out, (text, out)


def test_inspect_json_is_the_saved_config_and_the_tensor_shapes(adapter_dir, capsys):
    folder, stts = adapter_dir
    status, out, _ = run(capsys, "inspect", folder, "--json")
    assert status == 0
    summary = json.loads(out)
    assert summary["config"] == json.loads((folder / "stts_config.json").read_text())
    assert summary["parameters"] == sum(p.numel() for p in stts.scorer.parameters())
    assert summary["tensors"] == {
        f"scorer.{k}": {"shape": list(v.shape), "dtype": "float32"} for k, v in stts.scorer.state_dict().items()
    }
    assert summary["files"]["stts_model.safetensors"] == (folder / "stts_model.safetensors").stat().st_size


def test_inspect_a_repo_id_from_the_offline_cache_at_a_revision(adapter_dir, tmp_path, monkeypatch, capsys):
    folder, _ = adapter_dir
    cache = tmp_path / "hub-cache"
    repo = cache / "models--stts-org--tiny-stts"
    commit = "c" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "v2").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    status, out, _ = run(capsys, "inspect", "stts-org/tiny-stts", "--revision", "v2", "--json")
    assert status == 0
    summary = json.loads(out)
    assert summary["snapshot"] == str(repo / "snapshots" / commit)
    assert summary["config"]["prune_ratio"] == 0.25
    status, _, err = run(capsys, "inspect", "stts-org/tiny-stts")  # main is not cached
    assert status == 1
    assert "stts-adapter inspect: error:" in err and "stts-org/tiny-stts" in err


def test_inspect_refuses_a_folder_that_is_not_an_adapter(tmp_path, capsys):
    status, out, err = run(capsys, "inspect", tmp_path)
    assert status == 1 and out == ""
    assert "stts_config.json" in err and str(tmp_path) in err


# --------------------------------------------------------------------------------------------- bench
@pytest.mark.parametrize("family", FAMILIES)
def test_bench_times_every_family_on_a_synthetic_video(family, model_dir, tmp_path, capsys):
    results = tmp_path / "bench.json"
    status, out, _ = run(
        capsys, "bench", "--model", model_dir(family), "--frames", 4, "--repeats", 1, "--size", 56,
        "--json", results, "--no-progress", "--prune-layer", PRUNE_LAYER,
    )  # fmt: skip
    assert status == 0
    saved = json.loads(results.read_text())
    (row,) = saved["results"]
    config = load_tiny(model_dir, family).config
    height, width = row["frame_size"]
    assert (row["video_tokens"], row["video_tokens_kept"]) == expected_units(family, config, 4, height, width, 0.5)
    assert row["video_tokens_kept"] < row["video_tokens"]
    timing = row["forward_s"]
    assert timing["baseline"] > 0 and timing["stts"] > 0
    assert timing["speedup"] == pytest.approx(timing["baseline"] / timing["stts"])
    table = out.splitlines()
    header = "| frames | frame size | prune ratio | video tokens | forward baseline | forward STTS | speed-up |"
    assert header in table
    assert f"| 4 | {height}x{width} | 50% | {row['video_tokens']} -> {row['video_tokens_kept']} |" in out
    assert f"({family})" in out and f"prune_layer {PRUNE_LAYER}" in out


def test_bench_has_a_row_per_frame_count_and_ratio(model_dir, tmp_path, capsys):
    results = tmp_path / "bench.json"
    status, out, _ = run(
        capsys, "bench", "--model", model_dir("qwen2_5_vl"), "--frames", 4, 6, "--ratios", 0.25, 0.5,
        "--repeats", 1, "--size", 56, "--json", results, "--no-progress",
    )  # fmt: skip
    assert status == 0
    rows = json.loads(results.read_text())["results"]
    assert [(r["frames"], r["prune_ratio"]) for r in rows] == [(4, 0.25), (4, 0.5), (6, 0.25), (6, 0.5)]
    config = load_tiny(model_dir, "qwen2_5_vl").config
    for r in rows:
        assert (r["video_tokens"], r["video_tokens_kept"]) == expected_units(
            "qwen2_5_vl", config, r["frames"], 56, 56, r["prune_ratio"]
        )
    assert "train step" not in out
    assert len([line for line in out.splitlines() if line.startswith("| 4 |") or line.startswith("| 6 |")]) == 4


def test_bench_with_an_adapter_uses_its_ratio_and_layer_and_times_training(model_dir, adapter_dir, tmp_path, capsys):
    folder, _ = adapter_dir
    status, out, _ = run(
        capsys, "bench", "--model", model_dir("qwen2_5_vl"), "--adapter", folder, "--frames", 8, "--repeats", 1,
        "--size", 56, "--train", "--json", tmp_path / "bench.json", "--no-progress",
    )  # fmt: skip
    assert status == 0
    config = load_tiny(model_dir, "qwen2_5_vl").config
    units, kept = expected_units("qwen2_5_vl", config, 8, 56, 56, 0.25)
    assert f"| 25% | {units} -> {kept} |" in out
    assert f"adapter {folder}" in out and f"prune_layer {PRUNE_LAYER}" in out
    assert "| train step baseline | train step STTS | speed-up |" in out
    (row,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert row["train_step_s"]["baseline"] > 0 and row["train_step_s"]["stts"] > 0


def test_bench_shows_a_progress_bar_on_a_terminal_only(model_dir, capsys, monkeypatch):
    args = ["bench", "--model", model_dir("llava_onevision"), "--frames", 2, "--repeats", 1]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    status, _, err = run(capsys, *args)
    assert status == 0 and "bench 2 frames, 50%" in err and "4/4" in err  # (warm-up + 1 run) x 2 variants
    status, _, err = run(capsys, *args, "--no-progress")
    assert status == 0 and err == ""


def test_bench_refuses_a_model_without_a_video_batch_builder(tmp_path, capsys):
    config = SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, image_size=28, patch_size=14
    )
    SiglipVisionModel(config).save_pretrained(tmp_path / "vit")
    status, _, err = run(capsys, "bench", "--model", tmp_path / "vit", "--frames", 2, "--no-progress")
    assert status == 1
    assert "siglip_vision" in err and "qwen2_5_vl" in err and "llava_onevision" in err


# --------------------------------------------------------------------------------------------- visualize
def square_units_changed(video, side):
    """Per Qwen temporal slot (2 frames) after the first, which `side`-px units (row-major) hold a pixel that differs
    from the previous slot's."""
    slots = video.unflatten(0, (-1, 2))  # (slots, 2, 3, H, W)
    changed = (slots[1:] != slots[:-1]).any(2).any(1)  # (slots - 1, H, W)
    rows, columns = video.shape[-2] // side, video.shape[-1] // side
    return changed.reshape(-1, rows, side, columns, side).any(4).any(2).flatten(1)


def test_visualize_similarity_keeps_where_the_square_moves(model_dir, tmp_path, capsys):
    out_png, masks = tmp_path / "pictures" / "kept.png", tmp_path / "kept.json"
    status, out, _ = run(
        capsys, "visualize", "--model", model_dir("qwen2_5_vl"), "--method", "similarity", "--prune-layer", 1,
        "--frames", 8, "--size", 112, "--prune-ratio", 0.5, "--out", out_png, "--json", masks, "--no-progress",
    )  # fmt: skip
    assert status == 0
    shown = json.loads(masks.read_text())
    assert shown["unit_grid"] == [4, 4] and shown["frame_size"] == [112, 112]
    assert shown["slot_of_frame"] == [0, 0, 1, 1, 2, 2, 3, 3]
    keep = torch.tensor(shown["keep_masks"]).flatten(1).bool()
    assert keep[0].all()  # the first temporal slot is never pruned
    assert int(keep.sum()) == shown["units_after"] == 32
    video = load_video("synthetic", 8, 112)
    changed = square_units_changed(video, 28)
    assert changed.any(1).all()
    assert (keep[1:] | ~changed).all(), "a unit the square moved through was pruned"
    assert "kept 32 of 64 units (50%)" in out
    with Image.open(out_png) as picture:
        assert picture.format == "PNG" and picture.width > picture.height > 112


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "llava_onevision"])
def test_visualize_an_adapter_shows_the_units_it_keeps(family, model_dir, tmp_path, capsys):
    torch.manual_seed(0)
    stts = apply_stts(load_tiny(model_dir, family), STTSConfig(prune_ratio=0.5, prune_layer=PRUNE_LAYER)).eval()
    stts.save_pretrained(str(tmp_path / "adapter"))
    masks = tmp_path / "kept.json"
    status, _, _ = run(
        capsys, "visualize", "--model", model_dir(family), "--adapter", tmp_path / "adapter", "--frames", 4,
        "--size", 64, "--out", tmp_path / "kept.png", "--json", masks, "--no-progress",
    )  # fmt: skip
    assert status == 0
    model, vfamily = load_tiny(model_dir, family), VIDEO_FAMILIES[family]
    _, pixels = prepare_video(load_video("synthetic", 4, 64), vfamily, model.config, 64, None)
    with torch.no_grad():
        expected = stts(**build_video_batch(model, vfamily, pixels)).stts.keep_masks[0]
    assert torch.tensor(json.loads(masks.read_text())["keep_masks"]).flatten(1).bool().equal(expected)


def test_kept_pixels_maps_qwen_slots_and_units_onto_frames():
    keep = torch.tensor([[True, False, False, True], [False, True, False, False]])  # 2 slots of 2x2 units
    pixels = kept_pixels(keep, (2, 2), frames=4, height=56, width=56)
    assert pixels.shape == (4, 56, 56)
    for frame in range(4):
        cells = keep[frame // 2].reshape(2, 2)
        for row in range(2):
            for column in range(2):
                block = pixels[frame, 28 * row : 28 * row + 28, 28 * column : 28 * column + 28]
                assert block.all() if cells[row, column] else not block.any()


def test_render_draws_kept_units_unchanged_and_pruned_units_in_grey_with_a_legend():
    frames = torch.rand(3, 3, 20, 30, generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(3, 20, 30, dtype=torch.bool)
    keep[:, :10] = True
    sheet, boxes = render_kept_units(frames, keep, ["a", "b", "c"], columns=2, min_side=60)
    picture = torch.from_numpy(np.array(sheet)).permute(2, 0, 1).float() / 255
    assert len(boxes) == 3 and boxes[1][0] > boxes[0][2] and boxes[2][1] > boxes[0][3]  # 2 columns, 2 rows
    for index, (left, top, right, bottom) in enumerate(boxes):
        assert (right - left, bottom - top) == (60, 40)  # scaled up x2
        tile = picture[:, top:bottom, left:right]
        expected = frames[index].repeat_interleave(2, 1).repeat_interleave(2, 2)
        assert torch.allclose(tile[:, :20], expected[:, :20], atol=1 / 255)
        luminance = (expected[:, 20:] * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0)
        grey = PRUNED_GREY[0] + PRUNED_GREY[1] * luminance
        assert torch.allclose(tile[:, 20:], grey.expand(3, -1, -1), atol=1 / 255)
        assert tile[:, 20:].min() >= PRUNED_GREY[0] - 1 / 255  # washed out, never black
    legend = picture[:, boxes[2][3] + 16 :, :]  # below the last row of captions
    assert (legend < 0.5).any(), "no legend text under the frames"


def test_visualize_needs_an_adapter_or_a_training_free_method(model_dir, adapter_dir, capsys):
    status, _, err = run(capsys, "visualize", "--model", model_dir("qwen2_5_vl"), "--no-progress")
    assert status == 1 and "--adapter" in err and "--method similarity" in err
    for extra in (["--method", "random"], ["--prune-layer", "2"]):  # an adapter brings its own
        with pytest.raises(SystemExit) as info:
            main(["visualize", "--model", "m", "--adapter", str(adapter_dir[0]), *extra])
        assert info.value.code == 2
        assert "applies without --adapter" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- the checkpoint's processor
@pytest.fixture(scope="session")
def model_with_processor_dir(tmp_path_factory):
    """`model_with_processor_dir(family)` -> a folder holding the family's tiny model AND its real processor class
    (tiny offline tokenizer), as a released checkpoint ships them."""
    folders = {}

    def get(family: str):
        if family not in folders:
            case = VIDEO_FAMILIES[family].load_case()
            torch.manual_seed(0)
            config = case.make_config()
            folders[family] = tmp_path_factory.mktemp(f"cli-processor-{family}")
            case.model_class(config).save_pretrained(folders[family])
            case.make_processor(config).save_pretrained(folders[family])
        return folders[family]

    return get


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "smolvlm", "internvl"])
def test_visualize_builds_the_batch_with_the_checkpoints_own_processor(
    family, model_with_processor_dir, tmp_path, capsys
):
    """SmolVLM2 and InternVL are the families whose processors do not mark video frames (prepare_inputs does)."""
    folder = model_with_processor_dir(family)
    masks = tmp_path / "kept.json"
    status, out, err = run(
        capsys, "visualize", "--model", folder, "--method", "similarity", "--prune-layer", PRUNE_LAYER,
        "--frames", 4, "--size", 56, "--out", tmp_path / "kept.png", "--json", masks, "--no-progress",
    )  # fmt: skip
    assert status == 0, err
    shown = json.loads(masks.read_text())
    processor_class = type(load_processor(str(folder))).__name__
    assert shown["batch"] == f"built by the checkpoint's {processor_class}" and processor_class in out
    config = load_tiny(lambda f: folder, family).config
    height, width = shown["frame_size"]
    assert (shown["units_before"], shown["units_after"]) == expected_units(family, config, 4, height, width, 0.5)
    # The same video through the processor by hand: the CLI pruned exactly what STTS prunes on it.
    model = load_tiny(lambda f: folder, family)
    stts = apply_stts(model, STTSConfig(method="similarity", prune_layer=PRUNE_LAYER)).eval()
    frames = prepare_video(load_video("synthetic", 4, 56), VIDEO_FAMILIES[family], config, 56, None)[0]
    clip = (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    prompt = f"{VIDEO_FAMILIES[family].load_case().video_prompt} Describe what happens in the video."
    inputs = prepare_inputs(load_processor(str(folder)), stts, text=[prompt], videos=[clip], return_tensors="pt")
    with torch.no_grad():
        expected = stts(**inputs).stts.keep_masks[0]
    assert torch.tensor(shown["keep_masks"]).flatten(1).bool().equal(expected)


def test_without_a_processor_the_batch_is_laid_out_and_the_output_says_how_to_use_one(model_dir, tmp_path, capsys):
    status, out, _ = run(
        capsys, "visualize", "--model", model_dir("qwen2_5_vl"), "--method", "similarity", "--frames", 4,
        "--size", 56, "--out", tmp_path / "kept.png", "--no-progress",
    )  # fmt: skip
    assert status == 0
    assert "ships no processor" in out and "processor.save_pretrained" in out


def test_a_processor_that_does_not_load_is_named_not_skipped_in_silence(model_with_processor_dir, tmp_path):
    """No processor files: None, quietly (the layout builder's case). Processor files that fail to load: None too,
    but with a warning that names the error, so the user knows their processor was not used."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model_with_processor_dir("qwen2_5_vl"), folder)
    assert load_processor(str(folder)) is not None
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.warns(UserWarning, match=r"did not load \(JSONDecodeError.*family's own builder"):
        assert load_processor(str(folder)) is None

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "config.json", bare / "config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_processor(str(bare)) is None


@pytest.mark.parametrize("family", ["qwen2_5_vl", "smolvlm"])
def test_bench_times_training_on_the_checkpoints_processor_batches(family, model_with_processor_dir, tmp_path, capsys):
    status, out, err = run(
        capsys, "bench", "--model", model_with_processor_dir(family), "--frames", 4, "--repeats", 1, "--size", 56,
        "--train", "--prune-layer", PRUNE_LAYER, "--json", tmp_path / "bench.json", "--no-progress",
    )  # fmt: skip
    assert status == 0, err
    assert "built by the checkpoint's" in out
    (row,) = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert row["video_tokens_kept"] < row["video_tokens"]
    assert row["train_step_s"]["baseline"] > 0 and row["train_step_s"]["stts"] > 0


@pytest.mark.parametrize("suffix", ["gif", "mp4"])
def test_visualize_writes_an_animation_of_the_kept_units(suffix, model_dir, tmp_path, capsys):
    animation = tmp_path / f"kept.{suffix}"
    status, out, err = run(
        capsys, "visualize", "--model", model_dir("qwen2_5_vl"), "--method", "similarity", "--frames", 6,
        "--size", 56, "--out", tmp_path / "kept.png", "--animation", animation, "--no-progress",
    )  # fmt: skip
    assert status == 0, err
    assert f"and {animation}" in out
    if suffix == "gif":
        with Image.open(animation) as picture:
            assert picture.n_frames == 6
    else:
        decoded, _ = decode_video_files(str(animation))
        assert decoded.shape[0] == 6


# --------------------------------------------------------------------------------------------- video files
@pytest.fixture
def video():
    return (moving_square_video(6, 56, 84) * 255).round() / 255  # exactly representable as uint8


def test_video_files_read_back_as_the_same_frames(video, tmp_path):
    as_uint8 = (video * 255).round().to(torch.uint8)
    np.save(tmp_path / "thwc.npy", as_uint8.permute(0, 2, 3, 1).numpy())
    torch.save(video, tmp_path / "tchw.pt")
    save_file({"video": video.contiguous()}, str(tmp_path / "v.safetensors"))
    (tmp_path / "frames").mkdir()
    for index, frame in enumerate(as_uint8):  # natural order: frame_10 after frame_9
        Image.fromarray(frame.permute(1, 2, 0).numpy()).save(tmp_path / "frames" / f"frame_{index * 5}.png")
    for source in ["thwc.npy", "tchw.pt", "v.safetensors", "frames"]:
        loaded = load_video(str(tmp_path / source))
        assert loaded.shape == video.shape and torch.allclose(loaded, video, atol=1e-6), source
    evenly = load_video(str(tmp_path / "thwc.npy"), frames=3)
    assert torch.allclose(evenly, video[[0, 2, 5]], atol=1e-6)


def test_a_video_file_decodes_with_the_transformers_loader_and_visualize_prunes_it(video, model_dir, tmp_path, capsys):
    frames = (video * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    write_video_file(tmp_path / "clip.mp4", frames, fps=4)
    loaded = load_video(str(tmp_path / "clip.mp4"))
    assert loaded.shape == video.shape
    assert (loaded - video).abs().mean() < 0.05  # H.264 is lossy
    args = ["visualize", "--model", model_dir("qwen2_5_vl"), "--method", "random", "--no-progress"]
    status, _, err = run(capsys, *args, "--video", tmp_path / "clip.mp4", "--out", tmp_path / "kept.png")
    assert status == 0, err
    assert (tmp_path / "kept.png").is_file()


def test_an_animated_gif_reads_frame_by_frame(video, tmp_path):
    images = [Image.fromarray((f * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()) for f in video]
    images[0].save(tmp_path / "v.gif", save_all=True, append_images=images[1:], duration=100, loop=0)
    loaded = load_video(str(tmp_path / "v.gif"))
    assert loaded.shape == video.shape
    assert (loaded - video).abs().mean() < 0.05  # GIF palettes are lossy


def test_unreadable_videos_are_refused_with_what_to_do(model_dir, tmp_path, capsys):
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 16)
    args = ["visualize", "--model", model_dir("qwen2_5_vl"), "--method", "random", "--no-progress"]
    status, _, err = run(capsys, *args, "--video", tmp_path / "clip.mp4")
    assert status == 1 and "could not be decoded as a video" in err
    status, _, err = run(capsys, *args, "--video", tmp_path / "missing.npy")
    assert status == 1 and "does not exist" in err
    np.save(tmp_path / "flat.npy", np.zeros((4, 5)))
    status, _, err = run(capsys, *args, "--video", tmp_path / "flat.npy")
    assert status == 1 and "(frames, 3, H, W)" in err


# --------------------------------------------------------------------------------------------- pixels
def test_processor_normalization_is_read_from_the_model_and_applied_once(model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(model_dir("qwen2_5_vl"), folder)
    assert processor_normalization(str(folder)) is None
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    normalization = processor_normalization(str(folder))
    assert normalization.mean.tolist() == [0.5] * 3 and normalization.source == "preprocessor_config.json"
    video = moving_square_video(2, 56, 56)
    config = load_tiny(model_dir, "qwen2_5_vl").config
    frames, pixels = prepare_video(video, VIDEO_FAMILIES["qwen2_5_vl"], config, None, normalization)
    assert torch.equal(frames, video) and torch.allclose(pixels, (video - 0.5) / 0.25)
    # Molmo2's batch builder normalises by itself: its pixels stay in [0, 1].
    config = load_tiny(model_dir, "molmo2").config
    frames, pixels = prepare_video(video, VIDEO_FAMILIES["molmo2"], config, None, normalization)
    assert torch.equal(frames, pixels)


def test_frames_are_sized_as_each_family_processor_sizes_them(model_dir):
    video = moving_square_video(2, 100, 150)
    sizes = {}
    for family in ["qwen2_5_vl", "qwen3_vl", "llava_onevision"]:
        config = load_tiny(model_dir, family).config
        sizes[family] = tuple(prepare_video(video, VIDEO_FAMILIES[family], config, 224, None)[0].shape[-2:])
    assert sizes["qwen2_5_vl"] == (140, 224)  # 28-px units, longer side 224
    assert sizes["qwen3_vl"] == (160, 224)  # 32-px units
    assert sizes["llava_onevision"] == (56, 56)  # the SigLIP input size


# --------------------------------------------------------------------------------------------- the module
def test_python_dash_m_runs_the_command_line(adapter_dir, tmp_path):
    folder, _ = adapter_dir
    result = subprocess.run(
        [sys.executable, "-m", "stts_adapter.cli", "inspect", str(folder)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "prune_ratio      0.25" in result.stdout
    assert os.listdir(tmp_path) == ["adapter"]  # wrote nothing


def test_version(capsys):
    from stts_adapter import __version__
    from stts_adapter.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"stts-adapter {__version__}"
