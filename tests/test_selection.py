"""Selection of the kept units, the baselines' scores, the soft key bias, the temporal loss and the scorer.

Every expected value is computed independently in this file, from the method spec (docs/stts-method.md) or a
brute-force Python reference, never by the function under test.
"""

import decimal
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stts_adapter.losses import logit_penalty, previous_frame_change, temporal_aux_loss
from stts_adapter.scorer import STTSScorer, UnitAttentionPool, soft_key_bias
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
    """float64 1 - cos(unit at t-1, unit at t), a unit being its patch vectors concatenated (the paper); a zero vector
    has cosine 0, first frames None."""
    units = unit_patches.double().flatten(1)
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


def ref_aux_loss(logits, unit_patches, previous, kind="bce"):
    """Mean over t >= 1, in float64, of: BCE(sigmoid(logit), clamp(1 - cos, 0.01, 0.99)) ("bce", ours),
    (sigmoid(logit) - (1 - cos))^2 ("mse", the paper), or KL(t || s) where the score s is above the clamped target t,
    0 below it ("bce_upper", ours)."""
    change = ref_change(unit_patches, previous)
    terms = []
    for z, c in zip(logits.tolist(), change):
        if c is None:
            continue
        s = 1 / (1 + math.exp(-z))
        if kind == "mse":
            terms.append((s - c) ** 2)
        else:
            t = min(max(c, 0.01), 0.99)  # the clamped target, a 1% margin from 0 and 1
            if kind == "bce_upper":
                terms.append(t * math.log(t / s) + (1 - t) * math.log((1 - t) / (1 - s)) if s > t else 0.0)
            else:
                terms.append(-(t * math.log(s) + (1 - t) * math.log(1 - s)))
    return sum(terms) / len(terms)


def ref_key_bias(logits, frame_of_unit, first, bias_min):
    """Spec: scores = sigmoid(logits), per frame rescaled to [bias_min, 1], then log; first frames and frames whose
    scores are all equal get 0. In 400-digit decimal arithmetic, so saturated scores stay distinct (1 - e^-800
    included)."""
    with decimal.localcontext() as context:
        context.prec = 400
        scores = [1 / (1 + (-decimal.Decimal(float(z))).exp()) for z in logits.tolist()]
        by_frame, out = {}, []
        for s, f in zip(scores, frame_of_unit):
            by_frame.setdefault(f, []).append(s)
        for s, f, is_first in zip(scores, frame_of_unit, first):
            low, high = min(by_frame[f]), max(by_frame[f])
            if is_first or high == low:
                out.append(0.0)
            else:
                rescaled = decimal.Decimal(bias_min) + (1 - decimal.Decimal(bias_min)) * (s - low) / (high - low)
                out.append(float(rescaled.ln()))
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
    frame2[1] += 0.1 * torch.randn(2, 8, generator=generator)
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
    assert 1e-4 < scores[4] < scores[5] and 1e-4 < scores[7] < scores[8]
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
    """Logits of 12 units (LAYOUT); video 1, frame 2 is constant."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(12, generator=generator) * 2
    logits[10:] = -0.4
    return logits


def test_soft_key_bias_matches_the_spec():
    logits = bias_inputs()
    frame_of_unit = [g for *_, g in ref_units((2, 3), (3, 2))]
    first = [f == 0 for _, f, _, _ in ref_units((2, 3), (3, 2))]
    bias = soft_key_bias(logits, torch.tensor(frame_of_unit), torch.tensor(first), BIAS_MIN)
    assert bias.shape == (12,)
    assert bias.dtype == torch.float32
    expected = ref_key_bias(logits, frame_of_unit, first, BIAS_MIN)
    torch.testing.assert_close(bias.double(), expected, atol=1e-5, rtol=0)


def test_soft_key_bias_range_extremes_and_zero_frames():
    logits = bias_inputs()
    bias = soft_key_bias(logits, LAYOUT.frame_of_unit, LAYOUT.is_first_frame, BIAS_MIN)
    assert bool((bias <= 0).all())
    assert bool((bias >= math.log(BIAS_MIN) - 1e-5).all())
    # First frames and the constant frame get 0.
    assert bias[[0, 1, 2, 6, 7, 10, 11]].tolist() == [0.0] * 7
    # Every other frame: its best unit gets 0, its worst log(bias_min) = -2.
    for units in ([3, 4, 5], [8, 9]):
        frame_logits = logits[units]
        best, worst = units[int(frame_logits.argmax())], units[int(frame_logits.argmin())]
        assert bias[best] == pytest.approx(0.0, abs=1e-6)
        assert bias[worst] == pytest.approx(-2.0, abs=1e-5)


def test_soft_key_bias_other_bias_min():
    logits = bias_inputs()
    assert soft_key_bias(logits, LAYOUT.frame_of_unit, LAYOUT.is_first_frame, 1.0).abs().max() == 0
    bias = soft_key_bias(logits, LAYOUT.frame_of_unit, LAYOUT.is_first_frame, 0.5)
    assert float(bias.min()) == pytest.approx(math.log(0.5), abs=1e-5)


def finite_difference_of_the_spec(logits, weights, unit, eps=1e-6):
    frame_of_unit, first = LAYOUT.frame_of_unit.tolist(), LAYOUT.is_first_frame.tolist()

    def objective(values):
        return float((ref_key_bias(values, frame_of_unit, first, BIAS_MIN) * weights.double()).sum())

    plus, minus = logits.detach().double().clone(), logits.detach().double().clone()
    plus[unit] += eps
    minus[unit] -= eps
    return (objective(plus) - objective(minus)) / (2 * eps)


def test_soft_key_bias_passes_gradient_to_the_logits():
    logits = bias_inputs().requires_grad_(True)
    bias = soft_key_bias(logits, LAYOUT.frame_of_unit, LAYOUT.is_first_frame, BIAS_MIN)
    assert bias.requires_grad
    weights = torch.linspace(0.5, 2.0, 12)
    (bias * weights).sum().backward()
    grad = logits.grad
    assert grad is not None
    assert bool(grad.isfinite().all())
    assert grad[[0, 1, 2, 6, 7, 10, 11]].abs().max() == 0  # first frames and constant frame: no bias, no gradient
    assert grad[[3, 4, 5]].abs().min() > 0  # the middle unit directly, the lowest and highest through its rescaling
    assert grad[[8, 9]].abs().max() == 0  # two units: always (log bias_min, 0), a constant
    middle = [3, 4, 5][int(logits[[3, 4, 5]].argsort()[1])]  # a unit that is neither the frame's min nor its max
    assert float(grad[middle]) == pytest.approx(finite_difference_of_the_spec(logits, weights, middle), rel=1e-4)


@pytest.mark.parametrize("centre", [-800.0, -30.0, -12.0, 12.0, 30.0, 800.0])
def test_soft_key_bias_gives_saturated_frames_their_gradient(centre):
    """Logits far from 0 give float32 sigmoid scores that tie (all exactly 1.0 above ~17, or differ only below
    1e-6), and float64 ones too beyond +-745; the frame still has distinct scores, so it is biased and the LM loss
    reaches its units."""
    logits = torch.tensor([centre, centre, centre, centre - 1.0, centre + 0.5, centre + 1.5, 0, 0, 0, 0, 0, 0])
    logits.requires_grad_(True)
    bias = soft_key_bias(logits, LAYOUT.frame_of_unit, LAYOUT.is_first_frame, BIAS_MIN)
    assert bias[3].item() == pytest.approx(-2.0, abs=1e-4) and bias[5].item() == pytest.approx(0.0, abs=1e-6)
    weights = torch.linspace(0.5, 2.0, 12)
    (bias * weights).sum().backward()
    assert bool(logits.grad.isfinite().all())
    assert logits.grad[[3, 4, 5]].abs().min() > 1e-3  # every unit of the frame: min, middle and max
    numeric = finite_difference_of_the_spec(logits, weights, 4, eps=1e-5)
    assert float(logits.grad[4]) == pytest.approx(numeric, rel=1e-3)


# --------------------------------------------------------------------------------------------- temporal aux loss
@pytest.mark.parametrize("kind", ["bce", "mse", "bce_upper"])
def test_temporal_aux_loss_equals_the_spec_formula(kind):
    generator = torch.Generator().manual_seed(0)
    layout = VideoLayout((3, 1, 2), (4, 2, 3), 3)  # the 1-frame video contributes nothing
    patches = torch.randn(layout.num_units, 3, 5, generator=generator)
    patches[5] = 2.5 * patches[1]  # identical after normalisation
    patches[6] = -patches[2]  # cosine -1: target 2, clamped to 1 by "bce"
    logits = torch.randn(layout.num_units, generator=generator) * 3
    previous = ref_previous((3, 1, 2), (4, 2, 3))
    loss = temporal_aux_loss(logits, patches, torch.tensor(previous), kind=kind)
    assert loss.dim() == 0
    assert loss.dtype == torch.float32
    assert float(loss) == pytest.approx(ref_aux_loss(logits, patches, previous, kind), rel=1e-5, abs=1e-7)


def test_temporal_aux_loss_default_is_bce():
    generator = torch.Generator().manual_seed(5)
    patches = torch.randn(12, 2, 4, generator=generator)
    logits = torch.randn(12, generator=generator)
    default = temporal_aux_loss(logits, patches, LAYOUT.previous_unit)
    assert torch.equal(default, temporal_aux_loss(logits, patches, LAYOUT.previous_unit, kind="bce"))
    with pytest.raises(ValueError, match="bce"):
        temporal_aux_loss(logits, patches, LAYOUT.previous_unit, kind="l1")


@pytest.mark.parametrize("kind", ["bce", "mse", "bce_upper"])
def test_temporal_aux_loss_gradient_on_the_logits_matches_the_spec(kind):
    generator = torch.Generator().manual_seed(1)
    layout = VideoLayout((2, 3), (3, 2), 2)
    patches = torch.randn(layout.num_units, 2, 4, generator=generator)
    logits = (torch.randn(layout.num_units, generator=generator) * 2).requires_grad_(True)
    previous = ref_previous((2, 3), (3, 2))
    temporal_aux_loss(logits, patches, torch.tensor(previous), kind=kind).backward()
    change = ref_change(patches, previous)
    count = sum(c is not None for c in change)
    expected = []
    for z, c in zip(logits.tolist(), change):
        s = 1 / (1 + math.exp(-z))
        if c is None:
            expected.append(0.0)
        elif kind == "bce":  # d BCE / d logit = sigmoid - target
            expected.append((s - min(max(c, 0.01), 0.99)) / count)
        elif kind == "bce_upper":  # the same above the target, 0 below
            expected.append(max(s - min(max(c, 0.01), 0.99), 0.0) / count)
        else:  # d (s - c)^2 / d logit = 2 (s - c) s (1 - s)
            expected.append(2 * (s - c) * s * (1 - s) / count)
    torch.testing.assert_close(logits.grad.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------- logit penalty
def test_logit_penalty_without_a_margin_is_the_mean_square():
    logits = torch.tensor([-3.0, 0.5, 2.0, 10.0], dtype=torch.float16)
    penalty = logit_penalty(logits)
    assert penalty.dtype == torch.float32
    assert float(penalty) == pytest.approx((9 + 0.25 + 4 + 100) / 4)


def test_logit_penalty_counts_only_the_part_beyond_its_margin_and_pulls_nothing_inside():
    logits = torch.tensor([-9.0, -6.0, -2.0, 0.0, 5.9, 8.0], requires_grad=True)
    penalty = logit_penalty(logits, margin=6.0)
    assert float(penalty) == pytest.approx((3**2 + 2**2) / 6)
    penalty.backward()
    # d/dl of (|l| - 6)^2 / 6 beyond the margin, pulling back towards it; 0 inside
    assert logits.grad.tolist() == pytest.approx([-1.0, 0.0, 0.0, 0.0, 0.0, 4.0 / 6])


def test_the_bce_aux_loss_keeps_a_gradient_where_the_mse_one_saturates():
    """A changing unit (target 1 - cos = 1.6) with a logit of -30: the paper's MSE on the sigmoid passes ~1e-13 back
    (the unit can never be corrected); the BCE on the logit passes (sigmoid - 1) / count."""
    patches = torch.randn(6, 2, 4, generator=torch.Generator().manual_seed(6))
    patches[3:] = -0.6 * patches[:3] + 0.1 * torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(7))
    layout = VideoLayout((2,), (3,), 2)
    gradients = {}
    for kind in ("bce", "mse"):
        logits = torch.full((6,), -30.0, requires_grad=True)
        temporal_aux_loss(logits, patches, layout.previous_unit, kind=kind).backward()
        gradients[kind] = logits.grad[3:].abs()
    assert bool((gradients["mse"] < 1e-11).all())
    assert bool((gradients["bce"] > 0.3).all())  # (1 - 0) / 3 units


def test_temporal_aux_loss_detach_target():
    generator = torch.Generator().manual_seed(2)
    patches = torch.randn(12, 4, 6, generator=generator)
    logits = torch.randn(12, generator=generator).requires_grad_(True)
    detached = patches.clone().requires_grad_(True)
    temporal_aux_loss(logits, detached, LAYOUT.previous_unit, detach_target=True).backward()
    assert detached.grad is None or detached.grad.abs().max() == 0
    attached = patches.clone().requires_grad_(True)
    temporal_aux_loss(logits, attached, LAYOUT.previous_unit, detach_target=False, kind="mse").backward()
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
@pytest.mark.parametrize("kind", ["bce", "mse"])
def test_temporal_aux_loss_is_finite_in_value_and_gradient(case, detach_target, kind):
    patches = huge_blank_identical_inputs()[case].clone().requires_grad_(True)
    logits = torch.tensor([0.0, 50.0, -50.0, 1e4, -1e4, 3.0] * 2).requires_grad_(True)
    loss = temporal_aux_loss(logits, patches, LAYOUT.previous_unit, detach_target=detach_target, kind=kind)
    assert bool(torch.isfinite(loss))
    loss.backward()
    assert bool(logits.grad.isfinite().all())
    if not detach_target:
        assert bool(patches.grad.isfinite().all())


def test_temporal_aux_loss_blank_and_identical_targets():
    logits = torch.full((12,), math.log(0.25 / 0.75))  # scores of 0.25
    cases = huge_blank_identical_inputs()
    # Blank frames: cosine guarded to 0, target 1.
    blank = temporal_aux_loss(logits, cases["blank"], LAYOUT.previous_unit, kind="mse")
    assert float(blank) == pytest.approx((0.25 - 1.0) ** 2, abs=1e-6)
    bce_blank = -(0.99 * math.log(0.25) + 0.01 * math.log(0.75))  # target 1, clamped to 0.99
    assert float(temporal_aux_loss(logits, cases["blank"], LAYOUT.previous_unit)) == pytest.approx(bce_blank)
    # Identical frames: cosine 1, target 0.
    identical = temporal_aux_loss(logits, cases["identical"], LAYOUT.previous_unit, kind="mse")
    assert float(identical) == pytest.approx(0.25**2, abs=1e-5)
    bce_identical = -(0.01 * math.log(0.25) + 0.99 * math.log(0.75))  # target 0, clamped to 0.01
    assert float(temporal_aux_loss(logits, cases["identical"], LAYOUT.previous_unit)) == pytest.approx(
        bce_identical, abs=1e-5
    )


def test_the_target_normalises_the_concatenated_unit_not_each_patch():
    """A unit whose faint patch changes and whose strong patch does not barely changes as a whole (the paper);
    normalising patch by patch would call it half changed."""
    strong, faint = torch.tensor([10.0, 0.0, 0.0]), torch.tensor([0.0, 0.1, 0.0])
    before = torch.stack([strong, faint])
    after = torch.stack([strong, -faint])
    patches = torch.stack([before, after])  # (2 units, 2 patches, 3)
    change, _ = previous_frame_change(patches, torch.tensor([-1, 0]))
    expected = 1 - (100 - 0.01) / (100 + 0.01)  # cos of the concatenated vectors
    assert float(change[1]) == pytest.approx(expected, abs=1e-6)
    assert float(change[1]) < 1e-3  # per-patch normalisation would give 1 - (1 - 1) / 2 = 1


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3, 1e20, 1e30])
def test_temporal_target_of_identical_frames_does_not_depend_on_scale(scale):
    """cos(x, x) = 1 for every non-zero x, so identical frames have target 0 at any magnitude (spec formula)."""
    generator = torch.Generator().manual_seed(4)
    frame = torch.randn(3, 2, 4, generator=generator)
    layout = VideoLayout((2,), (3,), 2)
    patches = scale * torch.cat([frame, frame])
    logits = torch.full((6,), math.log(0.25 / 0.75))
    loss = temporal_aux_loss(logits, patches, layout.previous_unit, kind="mse")
    assert float(loss) == pytest.approx(ref_aux_loss(logits, patches, [-1, -1, -1, 0, 1, 2], "mse"), abs=1e-5)
    assert float(loss) == pytest.approx(0.25**2, abs=1e-5)


def test_temporal_aux_loss_is_zero_without_a_second_frame():
    layout = VideoLayout((1, 1), (4, 2), 2)
    logits = torch.randn(6).requires_grad_(True)
    loss = temporal_aux_loss(logits, torch.randn(6, 2, 3), layout.previous_unit)
    assert float(loss.detach()) == 0.0
    assert bool(torch.isfinite(loss))
    loss.backward()  # still a graph: callers can add it to the LM loss
    assert logits.grad.abs().max() == 0


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
    """score = sigmoid(MLP([prev, curr])), prev = zeros on each video's first frame; the patches are layer-normed
    (without parameters) before the pooling."""
    scorer = make_scorer(1)
    raw = 5 * torch.randn(LAYOUT.num_units, P, D) + 3
    with torch.no_grad():
        scores = scorer(raw, LAYOUT.previous_unit)
        patches = (raw - raw.mean(-1, keepdim=True)) / (raw.var(-1, unbiased=False, keepdim=True) + 1e-6).sqrt()
        query = patches.mean(dim=1, keepdim=True)
        pooled = scorer.pool.attention(query, patches, patches, need_weights=False)[0].squeeze(1)
        previous = [pooled[p] if p >= 0 else torch.zeros(D) for p in ref_previous((2, 3), (3, 2))]
        expected = torch.sigmoid(scorer.mlp(torch.cat([torch.stack(previous), pooled], dim=-1)).squeeze(-1))
    torch.testing.assert_close(scores, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_unit_pooling_is_multihead_attention_from_the_mean_query_value_and_gradient(masked):
    """The pooling moves the key and value projections to the unit side; nn.MultiheadAttention, run on its own
    parameters with the patches' mean as query (and the padding as key_padding_mask), is the oracle, in float64."""
    torch.manual_seed(0)
    pool = UnitAttentionPool(D, HEADS).double()
    with torch.no_grad():  # biases away from 0, so that dropping the key bias is checked
        pool.attention.in_proj_bias.normal_()
        pool.attention.out_proj.bias.normal_()
    patches = torch.randn(7, 5, D, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(7, 5) < 0.7 if masked else None
    if masked:
        mask[:, 0] = True  # every unit has a patch
    pooled = pool(patches, mask)
    if masked:
        weights = mask.double().unsqueeze(-1)
        query = (patches * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True)
    else:
        query = patches.mean(dim=1, keepdim=True)
    padding = None if mask is None else ~mask
    expected = pool.attention(query, patches, patches, key_padding_mask=padding, need_weights=False)[0].squeeze(1)
    torch.testing.assert_close(pooled, expected, atol=1e-12, rtol=1e-10)
    direction = torch.randn_like(pooled)
    got = torch.autograd.grad((pooled * direction).sum(), [patches, *pool.parameters()])
    want = torch.autograd.grad((expected * direction).sum(), [patches, *pool.parameters()])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=1e-10)


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


def test_the_bce_upper_aux_loss_pushes_down_only_the_scores_above_their_change():
    """A unit that repeats its predecessor (target 0.01) and scores high is pushed down; a unit that changed and
    scores below its target gets no gradient, however low (the aux loss does not rank the units that changed); the
    loss is 0 when no score is above its target."""
    patches = torch.randn(6, 2, 4, generator=torch.Generator().manual_seed(8))
    patches[3] = patches[0]  # repeats its predecessor: change 0
    patches[4] = -patches[1]  # changed: cosine -1, target clamped to 0.99
    patches[5] = -patches[2]  # changed too
    layout = VideoLayout((2,), (3,), 2)
    logits = torch.tensor([0.0, 0.0, 0.0, 2.0, -1.0, -30.0], requires_grad=True)
    temporal_aux_loss(logits, patches, layout.previous_unit, kind="bce_upper").backward()
    assert float(logits.grad[3]) > 0.25  # (sigmoid(2) - 0.01) / 3: gradient descent lowers it
    assert float(logits.grad[4]) == 0.0 and float(logits.grad[5]) == 0.0  # changed, below their target
    assert bool((logits.grad[:3] == 0).all())  # first frame: no target
    below = torch.tensor([0.0, 0.0, 0.0, -6.0, -1.0, 4.5])
    assert float(temporal_aux_loss(below, patches, layout.previous_unit, kind="bce_upper")) == 0.0
