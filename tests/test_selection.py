"""Selection of the kept units, the baselines' scores, the soft key bias, the temporal loss and the scorer.

Every expected value is computed independently in this file, from the method spec (docs/stts-method.md) or a
brute-force Python reference, never by the function under test.
"""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stts_adapter.losses import temporal_aux_loss
from stts_adapter.scorer import STTSScorer, soft_key_bias
from stts_adapter.selection import (
    VideoLayout,
    pruned_unit_counts,
    random_scores,
    select_units,
    similarity_scores,
)

BIAS_MIN = math.exp(-2)


# --------------------------------------------------------------------------------------------- references
def ref_units(frames, units):
    """[(video, frame_in_video, unit_in_frame, global_frame)] for every unit of the flat layout."""
    rows, global_frame = [], 0
    for video, (t, u) in enumerate(zip(frames, units)):
        for frame in range(t):
            rows.extend((video, frame, unit, global_frame) for unit in range(u))
            global_frame += 1
    return rows


def ref_previous(frames, units):
    """Predecessor of every unit: same video, previous frame, same position; -1 on first frames."""
    rows = ref_units(frames, units)
    where = {(v, f, p): i for i, (v, f, p, _) in enumerate(rows)}
    return [where.get((v, f - 1, p), -1) if f > 0 else -1 for v, f, p, _ in rows]


def ref_prunable(t, u, keep_first_frame):
    return t * u - u if keep_first_frame else t * u


def ref_keep(scores, frames, units, counts, keep_first_frame):
    """Brute-force kept set: per video, drop the `counts[v]` lowest (score, position) units outside the first frame."""
    keep, start = [True] * len(scores), 0
    for t, u, n_pruned in zip(frames, units, counts):
        candidates = range(start + u, start + t * u) if keep_first_frame else range(start, start + t * u)
        for i in sorted(candidates, key=lambda i: (scores[i], i))[:n_pruned]:
            keep[i] = False
        start += t * u
    return keep


def ref_change(unit_patches, previous):
    """float64 1 - cos(concat of L2-normalised patches at t-1, at t); a zero vector has cosine 0, first frames None."""
    x = unit_patches.double()
    norms = x.norm(dim=-1, keepdim=True)
    units = torch.where(norms > 0, x / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.zeros_like(x))
    units = units.flatten(1)
    out = []
    for i, p in enumerate(previous):
        if p < 0:
            out.append(None)
            continue
        a, b = units[p], units[i]
        na, nb = float(a.norm()), float(b.norm())
        cos = float(a @ b) / (na * nb) if na > 0 and nb > 0 else 0.0
        out.append(1.0 - cos)
    return out


def ref_aux_loss(scores, unit_patches, previous):
    """Spec formula: mean over t >= 1 of (score - (1 - cos))^2, in float64."""
    change = ref_change(unit_patches, previous)
    terms = [(float(s) - c) ** 2 for s, c in zip(scores.tolist(), change) if c is not None]
    return sum(terms) / len(terms)


def ref_key_bias(scores, frame_of_unit, first, bias_min):
    """Spec: per frame rescale to [bias_min, 1] then log; first frames and constant frames get 0."""
    scores, out = scores.tolist(), []
    by_frame = {}
    for s, f in zip(scores, frame_of_unit):
        by_frame.setdefault(f, []).append(s)
    for s, f, is_first in zip(scores, frame_of_unit, first):
        low, high = min(by_frame[f]), max(by_frame[f])
        if is_first or high - low <= 1e-6:
            out.append(0.0)
        else:
            out.append(math.log(bias_min + (1 - bias_min) * (s - low) / (high - low)))
    return torch.tensor(out, dtype=torch.float64)


# --------------------------------------------------------------------------------------------- VideoLayout
LAYOUT = VideoLayout(frames_per_video=(2, 3), units_per_frame=(3, 2), patches_per_unit=4)


def test_layout_counts():
    assert LAYOUT.num_videos == 2
    assert LAYOUT.units_per_video == (6, 6)
    assert LAYOUT.num_units == 12
    assert LAYOUT.num_frames == 5
    assert LAYOUT.video_offsets == (0, 6, 12)


def test_layout_previous_unit_never_pairs_across_videos():
    expected = [-1, -1, -1, 0, 1, 2, -1, -1, 6, 7, 8, 9]
    assert LAYOUT.previous_unit.tolist() == expected
    # The first unit of the second video must not pair with the last frame of the first one.
    assert LAYOUT.previous_unit[6] == -1


def test_layout_frame_of_unit_and_is_first_frame():
    assert LAYOUT.frame_of_unit.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4]
    assert LAYOUT.is_first_frame.tolist() == [True] * 3 + [False] * 3 + [True] * 2 + [False] * 4
    assert LAYOUT.is_first_frame.dtype == torch.bool


def test_layout_split():
    per_unit = torch.arange(12 * 5).view(12, 5)
    first, second = LAYOUT.split(per_unit)
    assert first.shape == (2, 3, 5)
    assert second.shape == (3, 2, 5)
    assert first[1, 2].tolist() == per_unit[5].tolist()  # frame 1, unit 2 of video 0
    assert second[2, 1].tolist() == per_unit[11].tolist()  # frame 2, unit 1 of video 1
    assert second[0, 0].tolist() == per_unit[6].tolist()


def test_layout_needs_one_entry_per_video():
    with pytest.raises(ValueError):
        VideoLayout(frames_per_video=(2, 3), units_per_frame=(4,), patches_per_unit=1)


@st.composite
def layouts(draw):
    videos = draw(st.integers(1, 4))
    frames = tuple(draw(st.integers(1, 6)) for _ in range(videos))
    units = tuple(draw(st.integers(1, 12)) for _ in range(videos))
    return frames, units


@settings(max_examples=50, deadline=None)
@given(layouts())
def test_layout_matches_brute_force(spec):
    frames, units = spec
    layout = VideoLayout(frames, units, 1)
    rows = ref_units(frames, units)
    assert layout.num_units == len(rows)
    assert layout.previous_unit.tolist() == ref_previous(frames, units)
    assert layout.frame_of_unit.tolist() == [g for *_, g in rows]
    assert layout.is_first_frame.tolist() == [f == 0 for _, f, _, _ in rows]
    previous = layout.previous_unit.tolist()
    for i, p in enumerate(previous):
        if p >= 0:  # same video, previous frame, same position
            assert rows[p][0] == rows[i][0]
            assert rows[p][1] == rows[i][1] - 1
            assert rows[p][2] == rows[i][2]


# --------------------------------------------------------------------------------------------- budget
def test_pruned_unit_counts_floor_of_ratio_times_units():
    layout = VideoLayout((4, 3, 5), (5, 7, 1), 1)  # 20, 21 and 5 units
    assert pruned_unit_counts(layout, 0.5) == [10, 10, 2]
    assert pruned_unit_counts(layout, 0.3) == [6, 6, 1]
    assert pruned_unit_counts(layout, 0.0) == [0, 0, 0]


def test_pruned_unit_counts_decimal_ratio_is_not_lost_to_float_rounding():
    # 0.29 * 100 is 28.999999999999996 in floating point; the intended floor(0.29 x 100) is 29.
    layout = VideoLayout((2,), (50,), 1)
    assert pruned_unit_counts(layout, 0.29) == [29]
    assert pruned_unit_counts(layout, 0.29, keep_first_frame=False) == [29]


def test_pruned_unit_counts_clamped_so_the_first_frame_stays_whole():
    layout = VideoLayout((2, 1, 4), (4, 6, 3), 1)  # 8, 6, 12 units; first frames 4, 6, 3
    assert pruned_unit_counts(layout, 0.75) == [4, 0, 9]
    assert pruned_unit_counts(layout, 0.75, keep_first_frame=True) == [4, 0, 9]


def test_pruned_unit_counts_without_keep_first_frame():
    layout = VideoLayout((2, 1, 4), (4, 6, 3), 1)
    assert pruned_unit_counts(layout, 0.75, keep_first_frame=False) == [6, 4, 9]
    assert pruned_unit_counts(layout, 0.5, keep_first_frame=False) == [4, 3, 6]


@pytest.mark.parametrize("ratio", [math.nextafter(1.0, 0.0), 1.0 - 1e-10])
def test_ratio_below_one_never_prunes_a_whole_video(ratio):
    """Spec: n_pruned = floor(ratio x n) < n for every ratio < 1, so each video keeps at least one unit."""
    layout = VideoLayout((1, 2), (4, 3), 1)  # 4 and 6 units
    expected = [math.floor(Fraction(ratio) * 4), math.floor(Fraction(ratio) * 6)]
    assert expected == [3, 5]
    assert pruned_unit_counts(layout, ratio, keep_first_frame=False) == expected
    keep = select_units(torch.rand(10), layout, ratio, keep_first_frame=False)
    assert keep[:4].any() and keep[4:].any()


@settings(max_examples=50, deadline=None)
@given(layouts(), st.integers(1, 100).flatmap(lambda d: st.tuples(st.integers(0, d - 1), st.just(d))), st.booleans())
def test_pruned_unit_counts_exact_for_rational_ratios(spec, fraction, keep_first_frame):
    frames, units = spec
    k, d = fraction
    counts = pruned_unit_counts(VideoLayout(frames, units, 1), k / d, keep_first_frame)
    expected = [min((k * t * u) // d, ref_prunable(t, u, keep_first_frame)) for t, u in zip(frames, units)]
    assert counts == expected


@settings(max_examples=50, deadline=None)
@given(layouts(), st.floats(0.0, 1.0, exclude_max=True), st.booleans())
def test_pruned_unit_counts_bounds_for_any_ratio(spec, ratio, keep_first_frame):
    frames, units = spec
    counts = pruned_unit_counts(VideoLayout(frames, units, 1), ratio, keep_first_frame)
    for n_pruned, t, u in zip(counts, frames, units):
        prunable = ref_prunable(t, u, keep_first_frame)
        assert 0 <= n_pruned <= prunable
        assert n_pruned <= ratio * t * u + 1e-6  # never more than the budget
        if n_pruned < prunable:  # not clamped: it is the floor
            assert n_pruned > ratio * t * u - 1


# --------------------------------------------------------------------------------------------- select_units
def test_select_units_keeps_the_top_scores_of_each_video():
    # Video 0: 2 frames x 3 units; video 1: 3 frames x 2 units. Budget floor(0.5 * 6) = 3 each.
    scores = torch.tensor([0.0, 0.0, 0.0, 0.9, 0.1, 0.5, 0.0, 0.0, 0.2, 0.8, 0.3, 0.7])
    keep = select_units(scores, LAYOUT, 0.5)
    assert keep.dtype == torch.bool
    expected = [True, True, True, False, False, False, True, True, False, True, False, False]
    assert keep.tolist() == expected


def test_select_units_budget_is_per_video_not_global():
    # Video 1 scores far above video 0; a global sort would prune only video 0.
    scores = torch.tensor([0.1] * 6 + [0.9] * 6) + torch.linspace(0, 0.01, 12)
    keep = select_units(scores, LAYOUT, 0.5)
    assert (~keep[:6]).sum() == 3
    assert (~keep[6:]).sum() == 3


def test_select_units_first_frame_kept_even_when_it_scores_lowest():
    scores = torch.tensor([-5.0, -5.0, -5.0, 1.0, 2.0, 3.0, -5.0, -5.0, 1.0, 2.0, 3.0, 4.0])
    keep = select_units(scores, LAYOUT, 0.9)  # budget 5 each, clamped to 3 and 4
    assert keep.tolist() == [True] * 3 + [False] * 3 + [True] * 2 + [False] * 4
    unprotected = select_units(scores, LAYOUT, 0.5, keep_first_frame=False)
    assert unprotected.tolist() == [False] * 3 + [True] * 3 + [False] * 2 + [False, True, True, True]


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_select_units_first_frame_kept_whatever_the_score_values(bad):
    """The first frame is always kept, also if the other frames' scores are not finite."""
    layout = VideoLayout((2,), (3,), 1)
    scores = torch.tensor([0.0, 0.0, 0.0, bad, bad, bad])
    keep = select_units(scores, layout, 0.5)  # budget 3 = exactly the second frame
    assert keep.tolist() == [True, True, True, False, False, False]


def test_select_units_ties_are_broken_deterministically_by_position():
    scores = torch.full((12,), 0.5)
    keep = select_units(scores, LAYOUT, 0.5)
    # Earlier units go first among equal scores.
    assert keep.tolist() == ref_keep(scores.tolist(), (2, 3), (3, 2), [3, 3], True)
    assert keep.tolist() == [True] * 3 + [False] * 3 + [True] * 2 + [False, False, False, True]
    for _ in range(3):
        assert torch.equal(select_units(scores.clone(), LAYOUT, 0.5), keep)


def test_select_units_video_result_does_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    alone = VideoLayout((3,), (2,), 1)
    scores_b = torch.rand(6)
    keep_alone = select_units(scores_b, alone, 0.5)
    keep_batch = select_units(torch.cat([torch.rand(6), scores_b]), LAYOUT, 0.5)
    assert torch.equal(keep_batch[6:], keep_alone)


def test_select_units_carries_no_gradient():
    scores = torch.rand(12, requires_grad=True)
    keep = select_units(scores, LAYOUT, 0.5)
    assert not keep.requires_grad


@st.composite
def scored_layouts(draw):
    frames, units = draw(layouts())
    n = sum(t * u for t, u in zip(frames, units))
    value = st.one_of(st.floats(-1.0, 2.0, allow_nan=False), st.sampled_from([0.0, 0.25, 1.0]))
    scores = draw(st.lists(value, min_size=n, max_size=n))
    return frames, units, scores


@settings(max_examples=50, deadline=None)
@given(scored_layouts(), st.floats(0.0, 1.0, exclude_max=True), st.booleans())
def test_select_units_properties(spec, ratio, keep_first_frame):
    frames, units, raw = spec
    layout = VideoLayout(frames, units, 1)
    scores = torch.tensor(raw, dtype=torch.float32)
    values = scores.tolist()  # the float32 values, so ties are the ones select_units sees
    counts = pruned_unit_counts(layout, ratio, keep_first_frame)
    keep = select_units(scores, layout, ratio, keep_first_frame)
    assert keep.shape == (len(values),)
    start = 0
    for t, u, n_pruned in zip(frames, units, counts):
        video = keep[start : start + t * u]
        assert int((~video).sum()) == n_pruned  # exact budget
        assert int(video.sum()) == t * u - n_pruned
        if keep_first_frame:
            assert bool(video[:u].all())  # first frame always kept
        start += t * u
    # The kept units are the top scores of that video (ties: earlier units pruned first).
    assert keep.tolist() == ref_keep(values, frames, units, counts, keep_first_frame)


# --------------------------------------------------------------------------------------------- random baseline
def test_random_scores_seeded_draw_per_video_ignores_the_rest_of_the_batch():
    alone = VideoLayout((3,), (2,), 1)
    other = VideoLayout((2,), (3,), 1)
    batch = random_scores(LAYOUT, seed=5)
    assert batch.shape == (12,)
    assert torch.equal(batch[:6], random_scores(other, seed=5))
    assert torch.equal(batch[6:], random_scores(alone, seed=5))
    # Reordering the batch does not change a video's draw either.
    swapped = random_scores(VideoLayout((3, 2), (2, 3), 1), seed=5)
    assert torch.equal(swapped[:6], batch[6:])
    assert torch.equal(random_scores(LAYOUT, seed=5), batch)
    assert not torch.equal(random_scores(LAYOUT, seed=6), batch)
    assert bool(((batch >= 0) & (batch < 1)).all())


def test_random_scores_seeded_kept_set_independent_of_batch():
    alone = VideoLayout((3,), (2,), 1)
    keep_alone = select_units(random_scores(alone, seed=1), alone, 0.5)
    keep_batch = select_units(random_scores(LAYOUT, seed=1), LAYOUT, 0.5)
    assert torch.equal(keep_batch[6:], keep_alone)


def test_random_scores_without_seed_use_the_global_rng():
    torch.manual_seed(123)
    first = random_scores(LAYOUT, seed=None)
    second = random_scores(LAYOUT, seed=None)
    torch.manual_seed(123)
    expected = torch.rand(12)
    assert torch.equal(first, expected)
    assert not torch.equal(first, second)
    assert bool(((first >= 0) & (first < 1)).all())


# --------------------------------------------------------------------------------------------- similarity baseline
def make_changing_video(generator):
    """One video, 3 frames x 3 units x 2 patches x 8 dims: unit 0 static, unit 1 slightly, unit 2 fully changing."""
    frame0 = torch.randn(3, 2, 8, generator=generator)
    frame1 = frame0.clone()
    frame1[1] += 0.1 * torch.randn(2, 8, generator=generator)
    frame1[2] = torch.randn(2, 8, generator=generator)
    frame2 = frame1.clone()
    frame2[0] *= 3.0  # same direction: L2 normalisation makes it identical
    frame2[2] = -frame1[2]  # opposite: change 2
    return torch.cat([frame0, frame1, frame2])


def test_similarity_scores_identical_units_score_lowest():
    generator = torch.Generator().manual_seed(0)
    patches = make_changing_video(generator)
    layout = VideoLayout((3,), (3,), 2)
    scores = similarity_scores(patches, layout)
    assert scores.shape == (9,)
    assert scores[:3].tolist() == [1.0, 1.0, 1.0]  # first frame
    assert scores[3] == pytest.approx(0.0, abs=1e-5)  # identical to its previous frame
    assert scores[6] == pytest.approx(0.0, abs=1e-5)  # rescaled copy: identical after normalisation
    assert scores[8] == pytest.approx(2.0, abs=1e-5)  # opposite
    assert 1e-4 < scores[4] < scores[5]
    reference = ref_change(patches, ref_previous((3,), (3,)))
    torch.testing.assert_close(scores[3:].double(), torch.tensor(reference[3:], dtype=torch.float64), atol=1e-5, rtol=0)
    # The static units are the ones pruned first.
    keep = select_units(scores, layout, 2 / 9)
    assert keep.tolist() == [True, True, True, False, True, True, False, True, True]


def test_similarity_scores_never_pair_across_videos():
    generator = torch.Generator().manual_seed(1)
    video = make_changing_video(generator)
    layout = VideoLayout((3, 3), (3, 3), 2)
    a = similarity_scores(torch.cat([video, video]), layout)
    b = similarity_scores(torch.cat([-video, video]), layout)
    # Video 1's first frame scores 1 whatever video 0 holds.
    assert a[9:12].tolist() == [1.0, 1.0, 1.0]
    torch.testing.assert_close(a[9:], b[9:])


# --------------------------------------------------------------------------------------------- soft key bias
def bias_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(12, generator=generator)
    scores[10:] = 0.4  # video 1, frame 2: constant
    return scores


def test_soft_key_bias_matches_the_spec():
    scores = bias_inputs()
    frame_of_unit = [g for *_, g in ref_units((2, 3), (3, 2))]
    first = [f == 0 for _, f, _, _ in ref_units((2, 3), (3, 2))]
    bias = soft_key_bias(scores, torch.tensor(frame_of_unit), torch.tensor(first), BIAS_MIN)
    assert bias.shape == (12,)
    assert bias.dtype == torch.float32
    expected = ref_key_bias(scores, frame_of_unit, first, BIAS_MIN)
    torch.testing.assert_close(bias.double(), expected, atol=1e-5, rtol=0)


def test_soft_key_bias_range_extremes_and_zero_frames():
    scores = bias_inputs()
    bias = soft_key_bias(scores, LAYOUT.frame_of_unit, LAYOUT.is_first_frame, BIAS_MIN)
    assert bool((bias <= 0).all())
    assert bool((bias >= math.log(BIAS_MIN) - 1e-5).all())
    # First frames and the constant frame get 0.
    assert bias[[0, 1, 2, 6, 7, 10, 11]].tolist() == [0.0] * 7
    # Every other frame: its best unit gets 0, its worst log(bias_min) = -2.
    for units in ([3, 4, 5], [8, 9]):
        frame_scores = scores[units]
        best, worst = units[int(frame_scores.argmax())], units[int(frame_scores.argmin())]
        assert bias[best] == pytest.approx(0.0, abs=1e-6)
        assert bias[worst] == pytest.approx(-2.0, abs=1e-5)


def test_soft_key_bias_other_bias_min():
    scores = bias_inputs()
    assert soft_key_bias(scores, LAYOUT.frame_of_unit, LAYOUT.is_first_frame, 1.0).abs().max() == 0
    bias = soft_key_bias(scores, LAYOUT.frame_of_unit, LAYOUT.is_first_frame, 0.5)
    assert float(bias.min()) == pytest.approx(math.log(0.5), abs=1e-5)


def test_soft_key_bias_passes_gradient_to_scores():
    scores = bias_inputs().requires_grad_(True)
    bias = soft_key_bias(scores, LAYOUT.frame_of_unit, LAYOUT.is_first_frame, BIAS_MIN)
    assert bias.requires_grad
    weights = torch.linspace(0.5, 2.0, 12)
    (bias * weights).sum().backward()
    grad = scores.grad
    assert grad is not None
    assert bool(grad.isfinite().all())
    assert grad[[0, 1, 2, 6, 7, 10, 11]].abs().max() == 0  # first frames and constant frame: no bias, no gradient
    assert grad[[3, 4, 5]].abs().max() > 0
    assert grad[[8, 9]].abs().max() > 0
    # Compare with a float64 finite-difference of the spec formula on a middle unit of frame 1.
    middle = [3, 4, 5][int(scores[[3, 4, 5]].argsort()[1])]
    frame_of_unit, first = LAYOUT.frame_of_unit.tolist(), LAYOUT.is_first_frame.tolist()

    def objective(values):
        return float((ref_key_bias(values, frame_of_unit, first, BIAS_MIN) * weights.double()).sum())

    eps = 1e-6
    plus, minus = scores.detach().double().clone(), scores.detach().double().clone()
    plus[middle] += eps
    minus[middle] -= eps
    numeric = (objective(plus) - objective(minus)) / (2 * eps)
    assert float(grad[middle]) == pytest.approx(numeric, rel=1e-3)


# --------------------------------------------------------------------------------------------- temporal aux loss
def test_temporal_aux_loss_equals_the_spec_formula():
    generator = torch.Generator().manual_seed(0)
    layout = VideoLayout((3, 1, 2), (4, 2, 3), 3)  # the 1-frame video contributes nothing
    patches = torch.randn(layout.num_units, 3, 5, generator=generator)
    patches[5] = 2.5 * patches[1]  # identical after normalisation
    scores = torch.rand(layout.num_units, generator=generator)
    previous = ref_previous((3, 1, 2), (4, 2, 3))
    loss = temporal_aux_loss(scores, patches, torch.tensor(previous))
    assert loss.dim() == 0
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(ref_aux_loss(scores, patches, previous), rel=1e-5, abs=1e-7)


def test_temporal_aux_loss_gradient_on_scores_matches_the_spec():
    generator = torch.Generator().manual_seed(1)
    layout = VideoLayout((2, 3), (3, 2), 2)
    patches = torch.randn(layout.num_units, 2, 4, generator=generator)
    scores = torch.rand(layout.num_units, generator=generator).requires_grad_(True)
    previous = ref_previous((2, 3), (3, 2))
    temporal_aux_loss(scores, patches, torch.tensor(previous)).backward()
    change = ref_change(patches, previous)
    count = sum(c is not None for c in change)
    expected = [0.0 if c is None else 2 * (float(s) - c) / count for s, c in zip(scores.tolist(), change)]
    torch.testing.assert_close(scores.grad.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=1e-5)


def test_temporal_aux_loss_detach_target():
    generator = torch.Generator().manual_seed(2)
    patches = torch.randn(12, 4, 6, generator=generator)
    scores = torch.rand(12, generator=generator).requires_grad_(True)
    detached = patches.clone().requires_grad_(True)
    temporal_aux_loss(scores, detached, LAYOUT.previous_unit, detach_target=True).backward()
    assert detached.grad is None or detached.grad.abs().max() == 0
    attached = patches.clone().requires_grad_(True)
    temporal_aux_loss(scores, attached, LAYOUT.previous_unit, detach_target=False).backward()
    assert attached.grad is not None and attached.grad.abs().max() > 0


def huge_blank_identical_inputs():
    generator = torch.Generator().manual_seed(3)
    base = torch.randn(6, 2, 4, generator=generator)
    cases = {
        "blank": torch.zeros(12, 2, 4),
        "identical": torch.cat([base[:3], base[:3], base[:2], base[:2], base[:2]]),
        "huge": torch.full((12, 2, 4), 1e30),
        "huge_random": 1e30 * torch.randn(12, 2, 4, generator=generator),
        "blank_then_content": torch.cat([torch.zeros(3, 2, 4), base[:3], torch.zeros(2, 2, 4), base[:4]]),
        "partly_blank_unit": base.repeat(2, 1, 1) * torch.tensor([1.0, 0.0]).view(1, 2, 1),
        "tiny": torch.full((12, 2, 4), 1e-30),
    }
    return cases


@pytest.mark.parametrize("case", list(huge_blank_identical_inputs()))
@pytest.mark.parametrize("detach_target", [True, False])
def test_temporal_aux_loss_is_finite_in_value_and_gradient(case, detach_target):
    patches = huge_blank_identical_inputs()[case].clone().requires_grad_(True)
    scores = torch.full((12,), 0.5).requires_grad_(True)
    loss = temporal_aux_loss(scores, patches, LAYOUT.previous_unit, detach_target=detach_target)
    assert bool(torch.isfinite(loss))
    loss.backward()
    assert bool(scores.grad.isfinite().all())
    if not detach_target:
        assert bool(patches.grad.isfinite().all())


def test_temporal_aux_loss_blank_and_identical_targets():
    scores = torch.full((12,), 0.25)
    cases = huge_blank_identical_inputs()
    # Blank frames: cosine guarded to 0, target 1.
    blank = temporal_aux_loss(scores, cases["blank"], LAYOUT.previous_unit)
    assert float(blank) == pytest.approx((0.25 - 1.0) ** 2, abs=1e-6)
    # Identical frames: cosine 1, target 0.
    identical = temporal_aux_loss(scores, cases["identical"], LAYOUT.previous_unit)
    assert float(identical) == pytest.approx(0.25**2, abs=1e-5)


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, 1e20, 1e30])
def test_temporal_target_of_identical_frames_does_not_depend_on_scale(scale):
    """cos(x, x) = 1 for every non-zero x, so identical frames have target 0 at any magnitude (spec formula)."""
    generator = torch.Generator().manual_seed(4)
    frame = torch.randn(3, 2, 4, generator=generator)
    layout = VideoLayout((2,), (3,), 2)
    patches = scale * torch.cat([frame, frame])
    scores = torch.full((6,), 0.25)
    loss = temporal_aux_loss(scores, patches, layout.previous_unit)
    assert float(loss) == pytest.approx(ref_aux_loss(scores, patches, [-1, -1, -1, 0, 1, 2]), abs=1e-5)
    assert float(loss) == pytest.approx(0.25**2, abs=1e-5)


def test_temporal_aux_loss_is_zero_without_a_second_frame():
    layout = VideoLayout((1, 1), (4, 2), 2)
    scores = torch.rand(6).requires_grad_(True)
    loss = temporal_aux_loss(scores, torch.randn(6, 2, 3), layout.previous_unit)
    assert float(loss.detach()) == 0.0
    assert bool(torch.isfinite(loss))
    loss.backward()  # still a graph: callers can add it to the LM loss
    assert scores.grad.abs().max() == 0


# --------------------------------------------------------------------------------------------- the scorer
D, H, HEADS, P = 16, 32, 4, 4


def make_scorer(seed=0):
    torch.manual_seed(seed)
    return STTSScorer(D, H, HEADS).eval()


def test_scorer_output_shape_and_range():
    scorer = make_scorer()
    patches = torch.randn(LAYOUT.num_units, P, D)
    with torch.no_grad():
        scores = scorer(patches, LAYOUT.previous_unit)
    assert scores.shape == (12,)
    assert bool(((scores > 0) & (scores < 1)).all())
    # Large inputs still land in [0, 1] and are not NaN.
    with torch.no_grad():
        scores = scorer(1e3 * patches, LAYOUT.previous_unit)
    assert bool(((scores >= 0) & (scores <= 1)).all())


def test_scorer_logits_are_the_scores_before_the_sigmoid():
    scorer = make_scorer()
    patches = torch.randn(LAYOUT.num_units, P, D)
    with torch.no_grad():
        logits = scorer(patches, LAYOUT.previous_unit, output_logits=True)
        scores = scorer(patches, LAYOUT.previous_unit)
    torch.testing.assert_close(torch.sigmoid(logits), scores)
    assert bool(((logits < 0) | (logits > 1)).any())  # not the scores themselves


def test_scorer_first_frame_pairs_with_zeros_and_others_with_previous_frame():
    """score = sigmoid(MLP([prev, curr])), prev = zeros on each video's first frame."""
    scorer = make_scorer(1)
    patches = torch.randn(LAYOUT.num_units, P, D)
    with torch.no_grad():
        scores = scorer(patches, LAYOUT.previous_unit)
        query = patches.mean(dim=1, keepdim=True)
        pooled = scorer.pool.attention(query, patches, patches, need_weights=False)[0].squeeze(1)
        previous = [pooled[p] if p >= 0 else torch.zeros(D) for p in ref_previous((2, 3), (3, 2))]
        expected = torch.sigmoid(scorer.mlp(torch.cat([torch.stack(previous), pooled], dim=-1)).squeeze(-1))
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-5)


def test_scorer_previous_frame_changes_frame_one_only():
    scorer = make_scorer(2)
    patches = torch.randn(LAYOUT.num_units, P, D)
    changed = patches.clone()
    changed[0:3] = torch.randn(3, P, D)  # video 0, frame 0
    with torch.no_grad():
        before = scorer(patches, LAYOUT.previous_unit)
        after = scorer(changed, LAYOUT.previous_unit)
    assert (before[3:6] - after[3:6]).abs().max() > 1e-5  # frame 1 sees frame 0
    torch.testing.assert_close(after[6:], before[6:])  # the other video is untouched


def test_scorer_first_frame_does_not_depend_on_another_video():
    scorer = make_scorer(3)
    patches = torch.randn(LAYOUT.num_units, P, D)
    changed = patches.clone()
    changed[:6] = torch.randn(6, P, D)  # all of video 0, including the frame just before video 1
    with torch.no_grad():
        before = scorer(patches, LAYOUT.previous_unit)
        after = scorer(changed, LAYOUT.previous_unit)
        alone = scorer(patches[6:], VideoLayout((3,), (2,), P).previous_unit)
    torch.testing.assert_close(after[6:], before[6:])
    torch.testing.assert_close(before[6:], alone)


def test_scorer_gradient_reaches_its_parameters():
    scorer = make_scorer(4).train()
    scores = scorer(torch.randn(LAYOUT.num_units, P, D), LAYOUT.previous_unit)
    scores.sum().backward()
    for name, parameter in scorer.named_parameters():
        assert parameter.grad is not None, name
        assert bool(parameter.grad.isfinite().all()), name


def test_scorer_rejects_heads_that_do_not_divide_the_width():
    with pytest.raises(ValueError, match="num_heads"):
        STTSScorer(10, 8, 3)


def test_scorer_init_zero_biases_and_truncated_normal_weights():
    torch.manual_seed(0)
    scorer = STTSScorer(64, 128, 4)
    biases = [(n, p) for n, p in scorer.named_parameters() if n.endswith("bias")]
    assert len(biases) == 5  # attention in/out projections and three MLP layers
    for name, parameter in biases:
        assert parameter.abs().max() == 0, name
    weights = [(n, p) for n, p in scorer.named_parameters() if n.endswith("weight")]
    assert len(weights) == 5
    for name, parameter in weights:
        weight = parameter.detach()
        fan_in = weight.shape[1]
        target = math.sqrt(1.0 / fan_in)
        ratio = float(weight.std()) / target
        # A normal with std sqrt(1/fan_in), truncated, has a sample std slightly below it (0.88x at +-2 std).
        if weight.numel() >= 4096:
            assert 0.8 < ratio < 1.05, (name, ratio)
            assert float(weight.abs().max()) <= 3 * target, name  # truncated
        else:  # the last layer has only H weights
            assert 0.65 < ratio < 1.25, (name, ratio)
        assert abs(float(weight.mean())) < 0.2 * target, name
    assert dict(weights)["pool.attention.in_proj_weight"].shape == (3 * 64, 64)
    assert dict(weights)["mlp.0.weight"].shape == (128, 128)


def test_scorer_with_units_of_different_sizes_ignores_padding_slots():
    torch.manual_seed(0)
    scorer = STTSScorer(input_size=8, hidden_size=16, num_heads=2)
    patches = torch.randn(4, 3, 8)
    mask = torch.tensor([[True, True, True], [True, False, False], [True, True, False], [True, True, True]])
    previous = torch.tensor([-1, -1, 0, 1])
    scores = scorer(patches * mask.unsqueeze(-1), previous, mask)
    garbage = patches + 100.0 * (~mask).unsqueeze(-1)  # anything in the padding slots
    torch.testing.assert_close(scorer(garbage, previous, mask), scores)
    # A full mask is exactly the unmasked computation.
    torch.testing.assert_close(scorer(patches, previous, torch.ones(4, 3, dtype=torch.bool)), scorer(patches, previous))
    # A one-patch unit with padding scores like the same unit given alone.
    alone = scorer(patches[1:2, :1], torch.tensor([-1]))
    torch.testing.assert_close(scores[1:2], alone)
