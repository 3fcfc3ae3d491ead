"""benchmarks.speed: its smoke mode writes well-formed outputs, and its analytic FLOP model is exact.

The FLOP model counts the same operations `torch.utils.flop_counter.FlopCounterMode` counts (matmul, bmm and
convolution; attention through the math SDPA backend, whose products are bmm), from the same shapes, so the two must
agree up to float rounding: the tolerance is 1e-6 relative, and any larger gap means the model misses or misplaces a
term (the smallest one, the LLM's lm_head at a few frames, is ~1% of the total). No timing is asserted: timings
depend on the machine.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.speed.benchmark import new_model, pruned_forward
from benchmarks.speed.families import FAMILIES
from benchmarks.speed.flops import FlopCount, counted_flops, decoder_flops
from benchmarks.speed.main import main, parse_args
from benchmarks.speed.measure import bare, forward_step, gradient_probe, rewrap, round_robin, train_step
from benchmarks.speed.profiling import (
    BETWEEN,
    SCORING,
    STAGE_FLOPS,
    VIT_STAGES,
    WHOLE,
    StageClock,
    median_stage_times,
    stage_flops,
    stage_table,
)
from benchmarks.speed.report import round_range, rounds_note, scorer_shares

REPO = Path(__file__).resolve().parents[1]
EXACT = 1e-6  # relative: both sides count the same ops from the same shapes (see the module docstring)
KINDS = ("forward", "generate", "train_scorer", "train_whole")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> Path:
    """The output directory of `python -m benchmarks.speed --quick` (both families, 8 frames of 112 px, one ratio, one
    repeat), run from the repository's root."""
    out = tmp_path_factory.mktemp("speed")
    command = [sys.executable, "-m", "benchmarks.speed", "--quick", "--threads", "1", "--out", str(out)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return out


# ------------------------------------------------------------------------------------------------ smoke mode
def test_quick_run_writes_consistent_json(quick_run: Path) -> None:
    data = json.loads((quick_run / "speed.json").read_text())
    assert data["settings"]["size"] == 112 and data["settings"]["prune_layer"] == 3
    rows = data["results"]
    assert [r["family"] for r in rows] == ["qwen2_5_vl", "llava_onevision"]
    for row in rows:
        assert (row["frames"], row["prune_ratio"], row["repeats"]) == (8, 0.5, 1)
        before, after = row["video_tokens"]
        assert after == before - before // 2  # floor(0.5 x units) pruned, the first frame fits in the rest
        assert row["llm_tokens"][0] - row["llm_tokens"][1] == before - after  # only placeholders are cut
        for kind in KINDS:
            entry = row[kind]
            assert entry["baseline_s"] > 0 and entry["stts_s"] > 0
            assert entry["speedup"] == pytest.approx(entry["baseline_s"] / entry["stts_s"])
            assert entry["baseline_runs_s"] == [entry["baseline_s"]] and entry["stts_runs_s"] == [entry["stts_s"]]
            assert entry["ideal"] > 1.0
            assert entry["of_ideal"] == pytest.approx(entry["speedup"] / entry["ideal"])
            assert 1.0 < entry["executed_flops_speedup"] <= entry["ideal"] * (1 + EXACT)
        memory = row["peak_memory_mib"]
        assert memory["baseline"] > 0 and memory["stts"] > 0 and memory["peak_reset"]
        assert 0 < row["scorer"]["forward_fraction"] < 1 and 0 < row["scorer"]["train_fraction"] < 1
        assert 0 < row["scorer"]["flops_fraction"] < 0.1
        check = row["flop_check"]
        assert check["baseline_analytic_over_counted"] == pytest.approx(1.0, rel=EXACT)
        assert check["stts_executed_analytic_over_counted"] == pytest.approx(1.0, rel=EXACT)


def test_quick_run_writes_markdown_and_plot(quick_run: Path) -> None:
    text = (quick_run / "speed.md").read_text()
    assert text.count("\n#### ") == 2 and "\n# " not in text  # a section per family, embeddable under README's ###
    assert "Qwen2.5-VL-style" in text and "LLaVA-OneVision-style" in text
    assert "peak RSS" in text and "Targets:" in text
    table_rows = [line for line in text.splitlines() if line.startswith("| 8 | 50% |")]
    assert len(table_rows) == 2 * 3  # per family: speed-ups, times, FLOP check
    png = (quick_run / "speed.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000


def test_render_rewrites_the_markdown_from_the_json(quick_run: Path, tmp_path: Path) -> None:
    (tmp_path / "speed.json").write_bytes((quick_run / "speed.json").read_bytes())
    main(["--render", "--out", str(tmp_path)])
    assert (tmp_path / "speed.md").read_text() == (quick_run / "speed.md").read_text()
    assert "Command: `python -m benchmarks.speed --quick --threads 1 --out " in (tmp_path / "speed.md").read_text()
    assert (tmp_path / "speed.png").read_bytes().startswith(b"\x89PNG")


def test_round_robin_warms_up_then_alternates_the_runs() -> None:
    calls: list[str] = []
    runs = [lambda name=name: calls.append(name) for name in "abc"]
    samples = round_robin(runs, repeats=2, measure=lambda run: (run(), len(calls))[1])
    assert calls == list("abc" + "abc" + "abc")  # one warm-up each, then two rounds in order
    assert samples == [[4, 7], [5, 8], [6, 9]]  # per run, its measurements in round order


def test_the_rounds_of_a_cell_give_its_spread() -> None:
    entry = {"ideal": 2.0, "baseline_runs_s": [2.0, 2.2, 1.8], "stts_runs_s": [1.0, 1.0, 1.2]}
    assert round_range(entry) == "1.50-2.20x"
    assert rounds_note(entry) == " (single rounds: 1.50-2.20x, 75%-110% of ideal)"
    assert round_range({"ideal": 2.0}) == "-" and rounds_note({"ideal": 2.0}) == ""  # rows without rounds


def test_the_scorer_share_is_of_the_pruned_step() -> None:
    """The issue's target is the scoring step against the pruned forward: 50 ms of a 1 s STTS forward is 5%, whatever
    the baseline took (2 s)."""
    seconds = {"forward": (2.0, 1.0, 0.05), "train_whole": (6.0, 4.0, 0.08)}  # baseline, STTS, scoring step
    row = {kind: {"speedup": base / stts} for kind, (base, stts, _) in seconds.items()}
    row["scorer"] = {
        "forward_fraction": seconds["forward"][2] / seconds["forward"][0],
        "train_fraction": seconds["train_whole"][2] / seconds["train_whole"][0],
    }
    assert scorer_shares(row) == pytest.approx((0.05 / 1.0, 0.08 / 4.0))


# ------------------------------------------------------------------------------------------------ FLOP model
def build(family_name: str, size: int) -> tuple[Any, Any, Any]:
    family = FAMILIES[family_name]
    config = family.make_config(size)
    args = parse_args(["--size", str(size)])
    return family, config, new_model(family, config, args)


def analytic(family: Any, config: Any, report: Any, length: int, size: int, **kwargs: Any):
    """(baseline, STTS as executed) FlopCounts for the kept units of `report`."""
    rows, columns = family.unit_grid(config, size)
    keep = report.keep_masks[0].reshape(-1, rows, columns)
    pruned = report.units_before[0] - report.units_after[0]
    base = family.flops(config, torch.ones_like(keep), length, 3)
    stts = family.flops(config, keep, length - pruned, 3, **kwargs)
    return base, stts


# Geometries whose segments are uneven: Qwen at 168 px has 6x6 units per slot, so windows of 4x4, 4x2, 2x4 and 2x2
# units (and block prune_layer + 1 pads them); LLaVA-OneVision at 70 px has a 5x5 patch grid, whose 3x3 units hold
# 4, 2 or 1 patches; 112 px gives even grids.
GEOMETRIES = [("qwen2_5_vl", 112), ("qwen2_5_vl", 168), ("llava_onevision", 70), ("llava_onevision", 112)]


@pytest.mark.parametrize(("family_name", "size"), GEOMETRIES)
def test_forward_flops_match_flop_counter(family_name: str, size: int) -> None:
    family, config, model = build(family_name, size)
    model.eval()
    batch = family.batch(config, 4, size, answer=True)
    forward = forward_step(model, batch)
    counted_base = counted_flops(bare(model, forward))
    model.set_prune_ratio(0.5)
    outputs = []
    counted_stts = counted_flops(lambda: outputs.append(forward()))
    hidden = model.scorer.hidden_size
    base, executed = analytic(
        family, config, outputs[0].stts, batch["input_ids"].shape[1], size, scorer_hidden=hidden, executed=True
    )
    assert base.counted_forward() == pytest.approx(counted_base, rel=EXACT)
    assert executed.counted_forward() == pytest.approx(counted_stts, rel=EXACT)


@pytest.mark.parametrize(
    ("family_name", "size"), [("qwen2_5_vl", 168), ("llava_onevision", 70), ("llava_onevision", 112)]
)
def test_training_flops_match_flop_counter(family_name: str, size: int) -> None:
    """Forward + backward of both training modes, baseline and STTS: the backward multipliers of
    `FlopCount.train_step` (including block prune_layer + 1 reached only through the key bias) are exact."""
    family, config, model = build(family_name, size)
    batch = family.batch(config, 4, size, answer=True)
    model.eval()
    report = pruned_forward(model, batch, 0.5, count=False)[0]
    hidden = model.scorer.hidden_size
    length = batch["input_ids"].shape[1]
    base, stts = analytic(family, config, report, length, size, scorer_hidden=hidden, executed=True)
    model.train()
    step = train_step(model, batch)
    assert base.train_step(False, counted=True) == pytest.approx(counted_flops(gradient_probe(model, step)), rel=EXACT)
    assert stts.train_step(False, counted=True) == pytest.approx(counted_flops(step), rel=EXACT)
    model = rewrap(model, train_base_model=True)
    step = train_step(model, batch)
    assert base.train_step(True, counted=True) == pytest.approx(counted_flops(bare(model, step)), rel=EXACT)
    assert stts.train_step(True, counted=True) == pytest.approx(counted_flops(step), rel=EXACT)


def synthetic_keep(frames: int, rows: int, columns: int, ratio: float, seed: int = 0) -> torch.Tensor:
    """A kept-unit mask as STTS makes it: the first frame whole, floor(ratio x units) of the others pruned."""
    units = frames * rows * columns
    order = torch.randperm(units - rows * columns, generator=torch.Generator().manual_seed(seed)) + rows * columns
    keep = torch.ones(units, dtype=torch.bool)
    keep[order[: int(ratio * units)]] = False
    return keep.reshape(frames, rows, columns)


@pytest.mark.parametrize(("queries", "keys"), [(1, 1), (1, 300), (7, 7), (300, 300), (5, 300)])
def test_the_llm_attention_counts_the_causal_pairs_and_sets_the_masked_rest_apart(queries: int, keys: int) -> None:
    """The ideal counts the query-key pairs a causal mask keeps (the last `queries` of `keys` positions, each up to
    its own), the masked rest of the rectangle apart: together they are what the math backend computes."""
    text_config = FAMILIES["qwen2_5_vl"].make_config(112).text_config
    _, needed, masked = decoder_flops(text_config, queries, keys)
    _, per_pair, _ = decoder_flops(text_config, 1, 1)  # one query, one key: one pair
    causal_pairs = int(torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries).sum())
    assert needed == per_pair * causal_pairs
    assert needed + masked == per_pair * queries * keys


@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "llava_onevision"])
def test_stts_flops_fall_with_the_ratio_and_equal_baseline_plus_scorer_at_zero(family_name: str) -> None:
    family = FAMILIES[family_name]
    config = family.make_config(224)
    rows, columns = family.unit_grid(config, 224)
    frames, length, hidden = 16, 2000, 512
    base = family.flops(config, synthetic_keep(frames, rows, columns, 0.0), length, 3)
    previous = None
    for ratio in (0.0, 0.3, 0.5, 0.8):
        keep = synthetic_keep(frames, rows, columns, ratio)
        pruned = keep.numel() - int(keep.sum())
        ideal = family.flops(config, keep, length - pruned, 3, scorer_hidden=hidden)
        executed = family.flops(config, keep, length - pruned, 3, scorer_hidden=hidden, executed=True)
        scorer = ideal.scorer + ideal.scorer_input
        assert scorer > 0 and base.scorer + base.scorer_input == 0
        assert executed.forward() >= ideal.forward()
        if ratio == 0:  # nothing pruned: the baseline's work plus the scorer's, exactly
            assert ideal.forward() == pytest.approx(base.forward() + scorer, rel=EXACT)
            assert executed.forward() == pytest.approx(ideal.forward(), rel=EXACT)  # 224 px: even windows and rows
        else:
            assert ideal.forward() < base.forward()
            assert ideal.forward() < previous.forward()
            for whole_model in (False, True):
                assert ideal.train_step(whole_model) < base.train_step(whole_model)
        # Blocks 0..prune_layer+1, the patch embedding and the scorer never shrink.
        assert (ideal.patch_embed, ideal.vit_head, ideal.bias_block) == (
            base.patch_embed,
            base.vit_head,
            base.bias_block,
        )
        previous = ideal


# ------------------------------------------------------------------------------------------------ --profile's stages
@pytest.mark.parametrize("family_name", ["qwen2_5_vl", "llava_onevision"])
def test_the_stage_clock_sees_every_stage_and_puts_the_scorer_in_the_scoring_stage(family_name: str) -> None:
    family, config, model = build(family_name, 112)
    model.eval()
    model.set_prune_ratio(0.5)
    step = forward_step(model, family.batch(config, 4, 112, answer=True))
    bare(model, step)()  # transformers installs its output-capturing hooks on a first forward, for good
    step()
    hooks_before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    clock = StageClock(model, family)
    scorer_ran_in = []
    probe = model.scorer.register_forward_hook(lambda *_: scorer_ran_in.append(set(clock._started)))
    try:
        times = median_stage_times(clock, {"baseline": bare(model, step), "STTS": step}, repeats=1)
    finally:
        probe.remove()
        clock.remove()
    assert hooks_before == sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert scorer_ran_in and all(started == {SCORING} for started in scorer_ran_in)
    for stages in times.values():  # the hooks saw every stage of both forwards
        assert all(stages[stage] > 0 for stage in STAGE_FLOPS if stage != SCORING)


def test_profile_prints_the_stage_table(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--profile", "--quick", "--threads", "1", "--family", "qwen2_5_vl", "--repeats", "1"])
    out = capsys.readouterr().out
    table = out[out.index("stages of the forward") :].split("\n\n")[0].splitlines()
    assert [line[2:34].rstrip() for line in table[2:-1]] == [*STAGE_FLOPS, BETWEEN, WHOLE]
    assert table[-1].startswith("  every stage at its FLOP speed-up: ")


def test_the_stages_cover_every_term_of_the_ideal_once() -> None:
    fields = sorted(field for stage_fields in STAGE_FLOPS.values() for field in stage_fields)
    outside_the_ideal = {"llm_attention_masked"}  # what the causal kernels skip
    assert fields == sorted(
        field.name for field in dataclasses.fields(FlopCount) if field.name not in outside_the_ideal
    )


def test_stts_at_every_stage_flop_speed_up_is_at_the_stage_bound() -> None:
    """Times made to fall exactly by each stage's FLOP ratio (the scorer at the ViT's time per FLOP) reach 100% of
    the bound; twice as slow a scoring step does not."""
    family = FAMILIES["qwen2_5_vl"]
    config = family.make_config(224)
    keep = synthetic_keep(8, *family.unit_grid(config, 224), 0.5)
    base = family.flops(config, torch.ones_like(keep), 600, 3)
    ideal = family.flops(config, keep, 600 - int((~keep).sum()), 3, scorer_hidden=512)
    base_flops, ideal_flops = stage_flops(base), stage_flops(ideal)
    seconds_per_flop = {stage: (index + 1) * 1e-12 for index, stage in enumerate(STAGE_FLOPS)}  # uneven efficiency
    baseline = {stage: base_flops[stage] * seconds_per_flop[stage] for stage in STAGE_FLOPS}
    vit_rate = sum(baseline[stage] for stage in VIT_STAGES) / sum(base_flops[stage] for stage in VIT_STAGES)
    stts = {stage: ideal_flops[stage] * seconds_per_flop[stage] for stage in STAGE_FLOPS}
    stts[SCORING] = ideal_flops[SCORING] * vit_rate
    for times in (baseline, stts):
        times[BETWEEN] = 0.01
        times[WHOLE] = sum(times.values())
    assert stage_table({"baseline": baseline, "STTS": stts}, base, ideal)[-1].endswith("= 100% of it")
    stts[WHOLE] += stts[SCORING]
    assert not stage_table({"baseline": baseline, "STTS": stts}, base, ideal)[-1].endswith("= 100% of it")


# ------------------------------------------------------------------------------------------------ real sizes, GPUs
def test_the_3b_family_has_qwen2_5_vl_3b_size() -> None:
    """The GPU family's config is Qwen2.5-VL-3B's: 3.75B parameters (the released model's size), 0.67B in the ViT.
    Built on the meta device: no memory, no download."""
    config = FAMILIES["qwen2_5_vl_3b"].make_config(448)
    with torch.device("meta"):
        model = FAMILIES["qwen2_5_vl_3b"].model_class(config)
    total = sum(p.numel() for p in model.parameters())
    assert total == pytest.approx(3.75e9, rel=5e-3)
    assert sum(p.numel() for p in model.model.visual.parameters()) == pytest.approx(0.67e9, rel=5e-3)
    assert FAMILIES["qwen2_5_vl_3b"].unit_grid(config, 448) == (16, 16)
    assert "qwen2_5_vl_3b" not in parse_args([]).family  # opt-in: far too big for the default CPU run


def test_the_llava_onevision_7b_config_has_the_released_models_size() -> None:
    """The serving estimate's LLaVA-OneVision-7B config: 8.03B parameters (llava-onevision-qwen2-7b-ov's size), 0.398B
    in the SigLIP tower, 14 x 14 pooled tokens per 384 px frame. Built on the meta device."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from stts_adapter.testing.llava_onevision import llava_onevision_7b_config, llava_onevision_video_units

    config = llava_onevision_7b_config()
    with torch.device("meta"):
        model = LlavaOnevisionForConditionalGeneration(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(8.03e9, rel=5e-3)
    assert sum(p.numel() for p in model.model.vision_tower.parameters()) == pytest.approx(0.398e9, rel=5e-3)
    assert llava_onevision_video_units(config) == 14 * 14


def run_quick(tmp_path: Path, *extra: str) -> dict[str, Any]:
    """`python -m benchmarks.speed --quick --family qwen2_5_vl --no-memory --no-flop-check EXTRA`: its speed.json."""
    command = [sys.executable, "-m", "benchmarks.speed", "--quick", "--threads", "1", "--family", "qwen2_5_vl"]
    command += ["--no-memory", "--no-flop-check", "--out", str(tmp_path), *extra]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=environment, cwd=REPO)
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads((tmp_path / "speed.json").read_text())


def test_bfloat16_runs_and_is_recorded(tmp_path: Path) -> None:
    data = run_quick(tmp_path, "--dtype", "bfloat16")
    assert data["settings"]["dtype"] == "bfloat16"
    (row,) = data["results"]
    assert all(row[kind]["baseline_s"] > 0 and row[kind]["stts_s"] > 0 for kind in KINDS)
    assert "bfloat16," in (tmp_path / "speed.md").read_text().splitlines()[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_cuda_path_in_bfloat16(tmp_path: Path) -> None:
    data = run_quick(tmp_path, "--device", "cuda", "--dtype", "bfloat16")
    assert data["settings"]["device"] == "cuda" and "(host:" in data["settings"]["machine"]


def test_the_serving_design_quotes_the_serving_estimate_table(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/serving.md's FLOP table and the README's table of the scorer's share at real shapes are the output of
    `python -m benchmarks.serving_estimate`, as it is now."""
    from benchmarks import serving_estimate

    serving_estimate.main()
    serving, scorer = capsys.readouterr().out.strip().split("\n\n")
    root = Path(__file__).parents[1]
    assert serving.count("\n") == 4 and serving in (root / "docs" / "serving.md").read_text()
    assert scorer.count("\n") == 5 and scorer in (root / "README.md").read_text()
