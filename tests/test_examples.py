"""The video-file example runs end to end: an mp4 written by the script, the real Qwen2.5-VL processor class with a
tiny offline tokenizer, STTS at 50%, generate, and the picture of the kept units."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_video_file_example_prunes_generates_and_draws(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "video_file.py")],
        cwd=tmp_path,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "example_clip.mp4: 96 video tokens -> 48 kept" in lines
    assert "the same 96 tokens buy 16 frames at 50% pruning" in lines  # 8 frames unpruned: 2x frames at 50%
    assert any(line.startswith("generated ids: [") and line.count(",") == 7 for line in lines)  # 8 new tokens
    assert (tmp_path / "example_clip.mp4").stat().st_size > 0
    assert (tmp_path / "video_file_kept.png").stat().st_size > 0


def run_trainer_example(output: Path, *arguments: str) -> dict:
    """The Trainer example on the tiny model, in this process's environment; returns its summary."""
    command = [sys.executable, str(REPO / "examples" / "train_with_trainer.py"), "--size", "tiny"]
    command += ["--output-dir", str(output), "--summary-json", str(output / "summary.json"), *arguments]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((output / "summary.json").read_text())


def test_the_trainer_example_runs_the_two_phase_bce_upper_llm_bias_recipe(tmp_path):
    """`--aux-loss bce_upper --llm-key-bias-weight 1 --scorer-first-steps 2` (README's recipe for a trained base):
    the saved adapter says so; before the switch only the scorer trains (1 and 2 steps: same LoRA, other scorer),
    after it only LoRA (2 and 4 steps: same scorer, other LoRA)."""
    recipe = ("--aux-loss", "bce_upper", "--llm-key-bias-weight", "1", "--scorer-first-steps", "2")
    one, two, four = (run_trainer_example(tmp_path / str(n), *recipe, "--max-steps", str(n)) for n in (1, 2, 4))
    saved = json.loads((tmp_path / "4" / "stts" / "stts_config.json").read_text())
    assert (saved["aux_loss"], saved["llm_key_bias_weight"]) == ("bce_upper", 1.0)
    assert [run["global_step"] for run in (one, two, four)] == [1, 2, 4]
    assert one["lora_checksum"] == two["lora_checksum"] and one["scorer_checksum"] != two["scorer_checksum"]
    assert two["scorer_checksum"] == four["scorer_checksum"] and two["lora_checksum"] != four["lora_checksum"]
