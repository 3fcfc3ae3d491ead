"""Test-time scaling helpers: the token count they predict is what STTS keeps on a real model, and the plan is the
largest that fits the budget."""

import pytest

from stts_adapter import STTSConfig, apply_stts
from stts_adapter.testing import Sample, build_qwen_batch, moving_square_video
from stts_adapter.tts import FramePlan, frames_for_budget, kept_video_tokens


@pytest.mark.parametrize(("frames", "ratio"), [(8, 0.5), (6, 0.3), (4, 0.8), (2, 0.5)])
def test_kept_video_tokens_is_what_stts_keeps(load, frames, ratio):
    model = load()
    stts = apply_stts(model, STTSConfig(prune_ratio=ratio, prune_layer=1))
    batch = build_qwen_batch(model.config, [Sample(video=moving_square_video(frames, 56, 84, square=14))])
    report = stts(**batch).stts
    units_per_slot = (56 // 28) * (84 // 28)  # Qwen2.5-VL: a unit is 2x2 patches of 14 px; 2 frames per slot
    assert report.units_after == [kept_video_tokens(frames, units_per_slot, ratio, frames_per_slot=2)]


@pytest.mark.parametrize(
    ("budget", "units", "ratio", "per_slot"), [(2592, 81, 0.5, 1), (72, 9, 0.5, 2), (500, 36, 0.8, 1)]
)
def test_the_plan_is_the_most_frames_that_fit(budget, units, ratio, per_slot):
    plan = frames_for_budget(budget, units, ratio, frames_per_slot=per_slot)
    assert plan.video_tokens == kept_video_tokens(plan.frames, units, ratio, per_slot) <= budget
    assert kept_video_tokens(plan.frames + per_slot, units, ratio, per_slot) > budget  # one more slot does not fit
    assert frames_for_budget(budget, units, ratio, per_slot, max_frames=10).frames == min(plan.frames, 10)


def test_the_papers_test_time_scaling_setting():
    """The video-QA long task: the baseline's 16 frames (8 slots of 9 units) buy STTS 32 frames at 50%."""
    assert frames_for_budget(8 * 9, 9, 0.5, frames_per_slot=2) == FramePlan(32, 0.5, 72)
    with pytest.raises(ValueError, match="does not hold one temporal slot"):
        frames_for_budget(8, 9, 0.5)
