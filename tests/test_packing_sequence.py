"""Varlen packing inside the ViT and sequence surgery on the LLM side.

The oracle for attention is `scaled_dot_product_attention` run separately on every segment; the oracle for the
sequence surgery is a brute-force per-row Python list.
"""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from stts_adapter.errors import STTSInputError
from stts_adapter.packing import RowPacking, TokenUnits, VarlenTokens, segment_ids, varlen_attention
from stts_adapter.sequence import SequencePruning, infer_padding_side, plan_sequence_pruning


# --------------------------------------------------------------------------------------------- packing fixtures
def make_tokens():
    """14 tokens in ViT order, 6 units of 2 patches (not contiguous in unit order), two -1 tokens.

    frame segments:  [0..4] [5..8] [9..13];  window segments: [0,1] [2..4] [5,6] [7,8] [9,10] [11..13].
    """
    token_unit = torch.tensor([1, 0, 1, 0, -1, 2, 2, 3, 3, 5, 4, 5, 4, -1])
    segments = {
        "frame": torch.tensor([0] * 5 + [1] * 4 + [2] * 5),
        "window": torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 5]),
    }
    return VarlenTokens(
        token_unit=token_unit, num_units=6, segments=segments, block_segments=("window", "frame", "window")
    )


def ref_cu_seqlens(segment_of_kept):
    """Lengths of the non-empty segments in order, as cumulative boundaries starting at 0."""
    lengths = []
    for segment in segment_of_kept:
        if lengths and segment == lengths[-1][0]:
            lengths[-1][1] += 1
        else:
            lengths.append([segment, 1])
    out = [0]
    for _, n in lengths:
        out.append(out[-1] + n)
    return out


# --------------------------------------------------------------------------------------------- VarlenTokens
def test_unit_token_index_lists_each_units_tokens_in_vit_order():
    tokens = make_tokens()
    index = tokens.unit_token_index()
    units = tokens.token_unit.tolist()
    expected = [[i for i, u in enumerate(units) if u == unit] for unit in range(6)]
    assert index.shape == (6, 2)
    assert index.tolist() == expected
    assert index.tolist()[0] == [1, 3]
    assert index.tolist()[4] == [10, 12]


def test_per_token_spreads_unit_values_and_fills_the_rest():
    tokens = make_tokens()
    per_unit = torch.tensor([10.0, 11.0, 12.0, 13.0, 14.0, 15.0])
    spread = tokens.per_token(per_unit, fill=-7.0)
    expected = [-7.0 if u < 0 else 10.0 + u for u in tokens.token_unit.tolist()]
    assert spread.tolist() == expected
    assert tokens.per_token(per_unit).tolist() == [0.0 if u < 0 else 10.0 + u for u in tokens.token_unit.tolist()]


def test_prune_keeps_kept_units_and_unprunable_tokens():
    tokens = make_tokens()
    keep_units = torch.tensor([True, False, True, True, False, True])
    pruned = tokens.prune(keep_units)
    units = tokens.token_unit.tolist()
    expected = [i for i, u in enumerate(units) if u < 0 or keep_units[u]]
    assert pruned.kept_tokens.tolist() == expected
    for kind, segment in tokens.segments.items():
        cu = pruned.cu_seqlens[kind]
        assert cu.dtype == torch.int32
        assert cu.tolist() == ref_cu_seqlens([segment[i].item() for i in expected])


def test_prune_drops_empty_segments():
    tokens = make_tokens()
    keep_units = torch.tensor([True, True, False, False, True, True])  # units 2 and 3: the whole of frame 1
    pruned = tokens.prune(keep_units)
    assert pruned.kept_tokens.tolist() == [0, 1, 2, 3, 4, 9, 10, 11, 12, 13]
    assert pruned.cu_seqlens["frame"].tolist() == [0, 5, 10]
    assert pruned.cu_seqlens["window"].tolist() == [0, 2, 5, 7, 10]
    lengths = pruned.cu_seqlens["window"].diff()
    assert bool((lengths > 0).all())
    assert torch.equal(pruned.block_cu_seqlens(0), pruned.cu_seqlens["window"])
    assert torch.equal(pruned.block_cu_seqlens(1), pruned.cu_seqlens["frame"])
    assert pruned.block_max_seqlen(0) == 3
    assert pruned.block_max_seqlen(1) == 5


def test_prune_keeping_everything_is_the_identity():
    tokens = make_tokens()
    pruned = tokens.prune(torch.ones(6, dtype=torch.bool))
    assert pruned.kept_tokens.tolist() == list(range(14))
    assert pruned.cu_seqlens["frame"].tolist() == [0, 5, 9, 14]
    assert pruned.cu_seqlens["window"].tolist() == [0, 2, 5, 7, 9, 11, 14]


def test_segment_ids():
    cu = torch.tensor([0, 3, 4, 9], dtype=torch.int32)
    assert segment_ids(cu).tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2]
    assert segment_ids(torch.tensor([0, 2], dtype=torch.int32)).tolist() == [0, 0]


# --------------------------------------------------------------------------------------------- varlen_attention
CU = torch.tensor([0, 3, 8, 9, 15], dtype=torch.int32)
N, HEADS, DIM = 15, 2, 8


def qkv(seed=0, n=N):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(n, HEADS, DIM, generator=generator) for _ in range(3)]


def oracle(query, key, value, cu, key_bias=None, scale=None):
    """SDPA on every segment separately."""
    outputs = []
    bounds = cu.tolist()
    for start, end in itertools.pairwise(bounds):
        q, k, v = (x[start:end].transpose(0, 1)[None] for x in (query, key, value))  # (1, H, L, d)
        mask = None if key_bias is None else key_bias[start:end].view(1, 1, 1, -1).to(q.dtype)
        outputs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)[0].transpose(0, 1))
    return torch.cat(outputs)


def test_varlen_attention_equals_per_segment_sdpa():
    query, key, value = qkv()
    out = varlen_attention(query, key, value, CU)
    assert out.shape == (N, HEADS, DIM)
    torch.testing.assert_close(out, oracle(query, key, value, CU), atol=1e-6, rtol=1e-5)


def test_varlen_attention_zero_bias_equals_no_bias():
    query, key, value = qkv(1)
    with_bias = varlen_attention(query, key, value, CU, key_bias=torch.zeros(N))
    torch.testing.assert_close(with_bias, oracle(query, key, value, CU), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(with_bias, varlen_attention(query, key, value, CU), atol=0, rtol=0)


def test_varlen_attention_with_key_bias_and_scale():
    query, key, value = qkv(2)
    bias = -2.0 * torch.rand(N, generator=torch.Generator().manual_seed(9))
    out = varlen_attention(query, key, value, CU, key_bias=bias, scale=0.3)
    torch.testing.assert_close(out, oracle(query, key, value, CU, key_bias=bias, scale=0.3), atol=1e-6, rtol=1e-5)
    # The bias really does something.
    assert (out - varlen_attention(query, key, value, CU, scale=0.3)).abs().max() > 1e-3


@pytest.mark.parametrize("removed", [0, 4, 7, 14])
def test_varlen_attention_minus_large_bias_removes_that_key(removed):
    query, key, value = qkv(3)
    bias = torch.zeros(N)
    bias[removed] = -1e4
    out = varlen_attention(query, key, value, CU, key_bias=bias)
    bounds = CU.tolist()
    segment = max(s for s in range(len(bounds) - 1) if bounds[s] <= removed)
    start, end = bounds[segment], bounds[segment + 1]
    others = [i for i in range(start, end) if i != removed]
    q = query[start:end].transpose(0, 1)[None]
    k, v = (x[others].transpose(0, 1)[None] for x in (key, value))
    expected = F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1)
    torch.testing.assert_close(out[start:end], expected, atol=1e-6, rtol=1e-5)
    # Other segments are untouched by that key's bias.
    rest = [i for i in range(N) if not start <= i < end]
    torch.testing.assert_close(out[rest], varlen_attention(query, key, value, CU)[rest], atol=0, rtol=0)


def test_varlen_attention_segments_never_see_each_other():
    query, key, value = qkv(4)
    base = varlen_attention(query, key, value, CU)
    key2, value2 = key.clone(), value.clone()
    key2[3:8] = torch.randn(5, HEADS, DIM)  # segment 1
    value2[3:8] = 100 * torch.randn(5, HEADS, DIM)
    changed = varlen_attention(query, key2, value2, CU)
    outside = [i for i in range(N) if not 3 <= i < 8]
    torch.testing.assert_close(changed[outside], base[outside], atol=1e-6, rtol=1e-6)
    assert (changed[3:8] - base[3:8]).abs().max() > 1e-2
    # A one-token segment attends to itself only.
    torch.testing.assert_close(base[8], value[8], atol=1e-6, rtol=1e-6)


def test_varlen_attention_single_segment_is_plain_attention():
    query, key, value = qkv(5)
    cu = torch.tensor([0, N], dtype=torch.int32)
    expected = F.scaled_dot_product_attention(*(x.transpose(0, 1) for x in (query, key, value))).transpose(0, 1)
    torch.testing.assert_close(varlen_attention(query, key, value, cu), expected, atol=1e-6, rtol=1e-5)


def test_pruned_varlen_attention_equals_unpruned_attention_on_kept_tokens():
    """After pruning, each segment attends exactly as the unpruned model would on its kept tokens."""
    tokens = make_tokens()
    keep_units = torch.tensor([True, False, False, False, True, True])
    pruned = tokens.prune(keep_units)
    query, key, value = qkv(6, n=14)
    kept = pruned.kept_tokens
    for kind, segment in tokens.segments.items():
        out = varlen_attention(query[kept], key[kept], value[kept], pruned.cu_seqlens[kind])
        expected = torch.empty_like(out)
        kept_list, segment_list = kept.tolist(), segment.tolist()
        for s in set(segment_list):
            rows = [j for j, i in enumerate(kept_list) if segment_list[i] == s]
            if not rows:
                continue
            idx = kept[rows]
            q, k, v = (x[idx].transpose(0, 1)[None] for x in (query, key, value))
            expected[rows] = F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------- sequence surgery
def ref_plan(real, placeholder, flags, padding_side):
    """Per row: kept columns in order, then padded on `padding_side` to the longest row. None marks padding."""
    flag_iter = iter(flags)
    rows = []
    for real_row, ph_row in zip(real, placeholder):
        kept = []
        for column, (is_real, is_ph) in enumerate(zip(real_row, ph_row)):
            keep_flag = next(flag_iter) if is_ph else True
            if is_real and keep_flag:
                kept.append(column)
        rows.append(kept)
    width = max((len(r) for r in rows), default=0)
    out = []
    for kept in rows:
        pad = [None] * (width - len(kept))
        out.append(pad + kept if padding_side == "left" else kept + pad)
    return out


def apply_ref(plan, tensor_rows, pad_value):
    return [[pad_value if c is None else tensor_rows[r][c] for c in row] for r, row in enumerate(plan)]


# Left-padded batch of 3 rows, 8 columns.
LEFT_MASK = torch.tensor(
    [
        [0, 0, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 1],
    ]
)
PLACEHOLDERS = torch.tensor(
    [
        [0, 0, 0, 1, 1, 1, 0, 0],
        [0, 1, 1, 1, 1, 0, 0, 0],
        [0, 0, 0, 0, 0, 1, 1, 0],
    ],
    dtype=torch.bool,
)
FLAGS = torch.tensor([True, False, True, False, False, True, False, False, True])  # row-major


def ids_tensor(batch, length):
    return torch.arange(batch * length).view(batch, length) + 100


def test_left_padded_input_stays_left_padded():
    plan = plan_sequence_pruning(PLACEHOLDERS, FLAGS, LEFT_MASK)
    assert plan.padding_side == "left"
    ids = ids_tensor(3, 8)
    out = plan.prune(ids, pad_value=0)
    # Hand-written: row 0 keeps columns 2,3,5,6,7; row 1 keeps 0,3,5,6,7; row 2 keeps 4,6,7 (placeholder 5 pruned).
    expected = [
        [102, 103, 105, 106, 107],
        [108, 111, 113, 114, 115],
        [0, 0, 120, 122, 123],
    ]
    assert out.tolist() == expected
    assert plan.attention_mask.tolist() == [[1] * 5, [1] * 5, [0, 0, 1, 1, 1]]
    # Each row's last position is its last real token (what generation reads).
    assert out[:, -1].tolist() == ids[:, -1].tolist()
    assert bool(plan.attention_mask[:, -1].bool().all())
    assert plan.keep_tokens.tolist()[2] == [False, False, False, False, True, False, True, True]


def test_right_padded_input_stays_right_padded():
    right_mask = LEFT_MASK.flip(1)
    placeholders = PLACEHOLDERS.flip(1)
    flags = torch.tensor([True, False, True, True, False, False, True, True, False])
    plan = plan_sequence_pruning(placeholders, flags, right_mask)
    assert plan.padding_side == "right"
    ids = ids_tensor(3, 8)
    out = plan.prune(ids, pad_value=-1)
    reference = ref_plan(right_mask.bool().tolist(), placeholders.tolist(), flags.tolist(), "right")
    assert out.tolist() == apply_ref(reference, ids.tolist(), -1)
    assert plan.attention_mask.tolist() == [[0 if c is None else 1 for c in row] for row in reference]
    # Right padding: every row starts with its first real token.
    assert out[:, 0].tolist() == ids[:, 0].tolist()


@pytest.mark.parametrize("default", ["left", "right"])
@pytest.mark.parametrize("mask", [None, "ones"])
def test_no_padding_uses_the_default_side(default, mask):
    placeholders = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    flags = torch.tensor([True, True, True, False, False, True])
    attention_mask = None if mask is None else torch.ones(2, 5, dtype=torch.long)
    plan = plan_sequence_pruning(placeholders, flags, attention_mask, default_padding_side=default)
    assert plan.padding_side == default
    out = plan.prune(ids_tensor(2, 5), pad_value=0)
    if default == "left":
        assert out.tolist() == [[100, 101, 102, 103, 104], [0, 0, 105, 108, 109]]
    else:
        assert out.tolist() == [[100, 101, 102, 103, 104], [105, 108, 109, 0, 0]]


def test_infer_padding_side():
    assert infer_padding_side(None) is None
    assert infer_padding_side(torch.ones(2, 4, dtype=torch.long)) is None
    assert infer_padding_side(LEFT_MASK) == "left"
    assert infer_padding_side(LEFT_MASK.flip(1)) == "right"
    assert infer_padding_side(LEFT_MASK.bool()) == "left"


def test_pruning_a_three_by_batch_by_length_tensor():
    plan = plan_sequence_pruning(PLACEHOLDERS, FLAGS, LEFT_MASK)
    generator = torch.Generator().manual_seed(0)
    positions = torch.randint(0, 50, (3, 3, 8), generator=generator)  # M-RoPE (t, h, w)
    out = plan.prune(positions, pad_value=1)
    assert out.shape == (3, 3, 5)
    reference = ref_plan(LEFT_MASK.bool().tolist(), PLACEHOLDERS.tolist(), FLAGS.tolist(), "left")
    for axis in range(3):
        assert out[axis].tolist() == apply_ref(reference, positions[axis].tolist(), 1)
        assert torch.equal(out[axis], plan.prune(positions[axis], pad_value=1))


def test_labels_and_masks_are_pruned_alike():
    plan = plan_sequence_pruning(PLACEHOLDERS, FLAGS, LEFT_MASK)
    labels = ids_tensor(3, 8)
    out = plan.prune(labels, pad_value=-100)
    assert out.tolist()[2][:2] == [-100, -100]
    pruned_mask = plan.prune(LEFT_MASK, pad_value=0)
    assert torch.equal(pruned_mask, plan.attention_mask)
    bool_out = plan.prune(PLACEHOLDERS, pad_value=False)
    assert bool_out.dtype == torch.bool


@pytest.mark.parametrize("shape", [(3, 7), (2, 8), (3, 3, 9), (8,)])
def test_mismatched_shape_raises_input_error(shape):
    plan = plan_sequence_pruning(PLACEHOLDERS, FLAGS, LEFT_MASK)
    with pytest.raises(STTSInputError):
        plan.prune(torch.zeros(shape, dtype=torch.long), pad_value=0)


def test_sequence_pruning_is_a_dataclass_with_the_plan():
    plan = plan_sequence_pruning(PLACEHOLDERS, FLAGS, LEFT_MASK)
    assert isinstance(plan, SequencePruning)
    assert plan.source_index.shape == plan.is_real.shape == (3, 5)


@st.composite
def batches(draw):
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(1, 10))
    side = draw(st.sampled_from(["left", "right", "none"]))
    default = draw(st.sampled_from(["left", "right"]))
    real = []
    for _ in range(batch):
        n_real = length if side == "none" else draw(st.integers(1, length))
        row = [False] * (length - n_real) + [True] * n_real
        real.append(row if side == "left" else row[::-1])
    placeholder = [[r and draw(st.booleans()) for r in row] for row in real]
    n_placeholders = sum(map(sum, placeholder))
    flags = draw(st.lists(st.booleans(), min_size=n_placeholders, max_size=n_placeholders))
    give_mask = side != "none" or draw(st.booleans())
    return real, placeholder, flags, side, default, give_mask


@settings(max_examples=50, deadline=None)
@given(batches())
def test_sequence_pruning_properties(spec):
    real, placeholder, flags, side, default, give_mask = spec
    batch, length = len(real), len(real[0])
    attention_mask = torch.tensor(real, dtype=torch.long) if give_mask else None
    plan = plan_sequence_pruning(
        torch.tensor(placeholder, dtype=torch.bool),
        torch.tensor(flags, dtype=torch.bool),
        attention_mask,
        default_padding_side=default,
    )
    has_padding = not all(all(row) for row in real)
    expected_side = side if has_padding else default
    assert plan.padding_side == expected_side
    reference = ref_plan(real, placeholder, flags, expected_side)
    ids = ids_tensor(batch, length)
    out = plan.prune(ids, pad_value=-1)
    assert out.tolist() == apply_ref(reference, ids.tolist(), -1)
    assert plan.attention_mask.tolist() == [[0 if c is None else 1 for c in row] for row in reference]
    # Every kept token appears exactly once, in order; pads are exactly the rest.
    for r, row in enumerate(out.tolist()):
        kept_columns = [c for c in range(length) if plan.keep_tokens[r, c]]
        real_values = [v for v in row if v != -1]
        assert real_values == [100 + r * length + c for c in kept_columns]
        assert len(set(real_values)) == len(real_values)
        assert row.count(-1) == len(row) - len(kept_columns)
        if expected_side == "left":
            assert row[: len(row) - len(kept_columns)] == [-1] * (len(row) - len(kept_columns))
        else:
            assert row[len(kept_columns) :] == [-1] * (len(row) - len(kept_columns))
    # A (3, B, L) tensor prunes plane by plane.
    stacked = torch.stack([ids, ids * 2, ids * 3])
    pruned = plan.prune(stacked, pad_value=-1)
    for axis in range(3):
        assert torch.equal(pruned[axis], plan.prune(stacked[axis], pad_value=-1))


# --------------------------------------------------------------------------------------------- row packing
@st.composite
def frame_keeps(draw):
    tokens_per_frame = draw(st.integers(1, 12))
    frames = draw(st.integers(1, 10))
    keep = draw(st.lists(st.booleans(), min_size=frames * tokens_per_frame, max_size=frames * tokens_per_frame))
    return torch.tensor(keep, dtype=torch.bool), tokens_per_frame


@settings(max_examples=80, deadline=None)
@given(frame_keeps())
def test_row_packing_properties(case):
    keep, tokens_per_frame = case
    packing = RowPacking.build(keep, tokens_per_frame)
    frames = keep.numel() // tokens_per_frame
    # No row exceeds its capacity, and every kept token appears exactly once.
    assert packing.source.shape[1] == tokens_per_frame
    placed = packing.source[packing.valid].tolist()
    assert sorted(placed) == torch.nonzero(keep).squeeze(1).tolist()
    # Slots know their frame; padding slots are -1.
    assert torch.equal(packing.frame[packing.valid], packing.source[packing.valid] // tokens_per_frame)
    assert bool((packing.frame[~packing.valid] == -1).all())
    # A frame's tokens stay in order and contiguous inside one row.
    for f in range(frames):
        rows, slots = torch.nonzero(packing.frame == f, as_tuple=True)
        if len(rows):
            assert len(set(rows.tolist())) == 1
            assert slots.tolist() == list(range(int(slots[0]), int(slots[0]) + len(slots)))
            assert packing.source[rows, slots].tolist() == sorted(packing.source[rows, slots].tolist())
    # First-fit decreasing never needs more rows than frames with something kept.
    assert packing.num_rows <= max(
        1, sum(int(keep[f * tokens_per_frame : (f + 1) * tokens_per_frame].any()) for f in range(frames))
    )
    # Scatter-back is the identity on kept tokens and leaves the fill elsewhere.
    hidden = torch.randn(frames, tokens_per_frame, 3)
    fill = torch.randn(frames, tokens_per_frame, 3)
    restored = packing.unpack(packing.pack(hidden), fill).flatten(0, 1)
    assert torch.equal(restored[keep], hidden.flatten(0, 1)[keep])
    assert torch.equal(restored[~keep], fill.flatten(0, 1)[~keep])
    # The block mask never lets tokens of different frames attend to each other; every query has a key.
    mask = packing.attention_mask(torch.float32)[:, 0]
    allowed = mask == 0
    for row in range(packing.num_rows):
        frame_of_slot = packing.frame[row]
        same = frame_of_slot[:, None] == frame_of_slot[None, :]
        assert torch.equal(allowed[row], same)
    assert bool(allowed.any(dim=-1).all())


def test_packed_attention_equals_per_frame_attention():
    """Oracle: attention over packed rows with the block mask equals attention run on each frame's kept tokens."""
    torch.manual_seed(0)
    frames, tokens_per_frame, dim = 5, 8, 4
    keep = torch.rand(frames * tokens_per_frame) > 0.5
    keep[::tokens_per_frame] = True
    packing = RowPacking.build(keep, tokens_per_frame)
    q, k, v = (torch.randn(frames, tokens_per_frame, dim) for _ in range(3))
    packed = F.scaled_dot_product_attention(
        packing.pack(q), packing.pack(k), packing.pack(v), attn_mask=packing.attention_mask(torch.float32)[:, 0]
    )
    restored = packing.unpack(packed, torch.zeros(frames, tokens_per_frame, dim))
    for f in range(frames):
        kept = keep.view(frames, tokens_per_frame)[f]
        expected = F.scaled_dot_product_attention(q[f][kept], k[f][kept], v[f][kept])
        torch.testing.assert_close(restored[f][kept], expected)


def test_units_of_different_sizes_are_gathered_with_a_mask():
    # 3 units: unit 0 has 3 tokens, unit 1 one token, unit 2 two tokens; token 3 belongs to no unit.
    tokens = TokenUnits(token_unit=torch.tensor([0, 1, 0, -1, 2, 0, 2]), num_units=3)
    index = tokens.unit_token_index()
    assert index.tolist() == [[0, 2, 5], [1, -1, -1], [4, 6, -1]]
    hidden = torch.arange(7.0).unsqueeze(-1) + 1
    patches, mask = tokens.gather_units(hidden)
    assert mask.tolist() == [[True, True, True], [True, False, False], [True, True, False]]
    assert patches.squeeze(-1).tolist() == [[1.0, 3.0, 6.0], [2.0, 0.0, 0.0], [5.0, 7.0, 0.0]]
