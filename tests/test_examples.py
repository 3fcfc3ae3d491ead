"""The video-file example runs end to end: an mp4 written by the script, the real Qwen2.5-VL processor class with a
tiny offline tokenizer, STTS at 50%, generate, and the picture of the kept units."""

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
