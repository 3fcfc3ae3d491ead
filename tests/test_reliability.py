"""Reliability: bad configs and inputs, degenerate videos, half precision, leaks, unload hygiene and determinism.

What the other files already prove is not repeated here (config ranges: test_config.py; corrupt or mismatched
adapters: test_adapter_io.py; unsupported models and PeftModels around them: test_registry.py; the per-family oracles:
test_conformance.py). This file runs the reliability guarantees over EVERY registered family (the conformance suite's
`FamilyCase`s, and the ViT-only `VisionCase`s where they apply); threads are in test_concurrency.py.
"""

import gc
import itertools
import math
import re
import weakref

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_conformance import CASES
from torch.nn.modules import module as torch_module

from stts_adapter import STTSConfig, STTSConfigError, STTSInputError, STTSModel, apply_stts, register_architecture
from stts_adapter.model_registry.vision_towers import SiglipVisionEntry
from stts_adapter.packing import FrameTokens, VarlenTokens
from stts_adapter.registry import _REGISTRY, find_architecture
from stts_adapter.runtime import active_pass
from stts_adapter.selection import VideoLayout, select_units
from stts_adapter.sequence import pad_token_id
from stts_adapter.testing import Sample, tokenize
from stts_adapter.testing.internvl import INTERNVL
from stts_adapter.testing.llava_onevision import LLAVA_ONEVISION
from stts_adapter.testing.molmo2 import MOLMO2
from stts_adapter.testing.qwen import QWEN2_5_VL, QWEN2_VL
from stts_adapter.testing.smolvlm import SMOLVLM
from stts_adapter.testing.vision import CLIP_VISION, SIGLIP2_VISION, SIGLIP_VISION, TIMM_VIT

VARLEN_CASES = [case for case in CASES if not case.packs_rows]  # one packed ViT sequence, units from video_grid_thw
VISION_CASES = [TIMM_VIT, SIGLIP_VISION, CLIP_VISION, SIGLIP2_VISION]
RATIO = 0.5
CHOICE_RATIO = 0.25  # on a 2-frame video, prunes half of the second frame: which half depends on the scores


# --------------------------------------------------------------------------------------------- helpers
def make_model(case):
    """The case's tiny random model (the same weights at every call), in eval mode."""
    if hasattr(case, "make_model"):  # a VisionCase
        return case.make_model()
    torch.manual_seed(0)
    return case.model_class(case.make_config()).eval()


def stts_of(model, case, **config):
    """STTS at the case's prune layer; the scorer is initialised from seed 0, the same at every call."""
    torch.manual_seed(0)
    return apply_stts(model, STTSConfig(prune_layer=case.prune_layer, **config))


def batch_of(case, model, videos, answers=False, padding_side="left"):
    samples = [
        Sample(video=video, prefix=[1, 11 + i], answer=[31 + i, 32] if answers else None)
        for i, video in enumerate(videos)
    ]
    return case.build_batch(model.config, samples, padding_side)


def bare_inputs(batch):
    """The batch without the keywords only STTS reads (what the bare model takes)."""
    return {k: v for k, v in batch.items() if k not in ("pixel_values_is_video", "pixel_values_video_index")}


def expected_units(case, config, dims, ratio=RATIO):
    """(units before, units after) of a (frames, height, width) video, from the processor's counts: floor(ratio x
    units) pruned, the first frame protected."""
    slots, per_frame = case.units(config, *dims)
    units = slots * per_frame
    return units, units - min(math.floor(ratio * units), units - per_frame)


def assert_finite(name, tensor):
    assert bool(torch.isfinite(tensor).all()), f"{name} holds NaN or Inf"


def vision_blocks(model):
    return find_architecture(model).get_vision_blocks(model)


def module_tree(module, prefix=""):
    """(path, module) of every module, walking the children as they are stored (`_modules`), wrappers included,
    whatever a module's own `named_modules` chooses to show."""
    yield prefix, module
    for name, child in vars(module)["_modules"].items():
        if child is not None:
            yield from module_tree(child, f"{prefix}.{name}" if prefix else name)


def stts_modules(model):
    return [name for name, module in module_tree(model) if type(module).__module__.startswith("stts_adapter")]


# --------------------------------------------------------------------------------------------- 1. validation
def last_block_that_matters(case, model):
    """The last ViT block whose computation changes the model's output, found by perturbing each block's input in
    the BARE model (independent of the entry's declarations)."""
    if hasattr(case, "make_model"):
        inputs = case.inputs(case.video(2, 0), [2])
        inputs.pop("frames_per_video")

        def run():
            return case.features(model(**inputs))
    else:
        batch = bare_inputs(batch_of(case, model, [case.video(1)]))

        def run():
            return model(**batch).logits

    def perturb_input(module, args, kwargs):  # changes what the block computes, whoever reads its output
        if args:
            return (args[0] + torch.linspace(-1, 1, args[0].shape[-1]), *args[1:]), kwargs
        hidden = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": hidden + torch.linspace(-1, 1, hidden.shape[-1])}

    with torch.no_grad():
        reference = run()
        last = -1
        for index, block in enumerate(vision_blocks(model)):
            handle = block.register_forward_pre_hook(perturb_input, with_kwargs=True)
            try:
                changed = not torch.equal(run(), reference)
            finally:
                handle.remove()
            if changed:
                last = index
    return last


@pytest.mark.parametrize("case", CASES + VISION_CASES, ids=repr)
def test_every_prune_layer_is_accepted_exactly_up_to_the_last_usable_block_of_this_model(case):
    """prune_layer k needs block k + 1 (it carries the key bias) to reach the output: every k up to the last block
    that matters minus one is accepted AND prunes; every later k is refused by apply_stts with an STTSConfigError
    naming the field, the value and the range, before the model is touched."""
    model = make_model(case)
    last = last_block_that_matters(case, model)
    depth = len(vision_blocks(model))
    assert 1 <= last <= depth - 1
    types_before = {name: type(module) for name, module in module_tree(model)}
    grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
    for prune_layer in [*range(depth + 1), depth + 7]:
        config = STTSConfig(prune_ratio=RATIO, prune_layer=prune_layer)
        if prune_layer <= last - 1:
            stts = apply_stts(model, config)
            if 0 < prune_layer < last - 1:  # the conformance suite runs the middle ones
                stts.unload()
                continue
            if hasattr(case, "make_model"):
                out = stts(**case.inputs(case.video(3, 0), [3]))
            else:
                out = stts(**batch_of(case, model, [case.video(1)]))
                assert_finite("logits", out.logits)
            assert out.stts.units_after[0] < out.stts.units_before[0]  # it really prunes
            stts.unload()
            continue
        with pytest.raises(STTSConfigError) as raised:
            apply_stts(model, config)
        message = str(raised.value)
        assert isinstance(raised.value, ValueError)
        assert f"prune_layer={prune_layer}" in message and f"between 0 and {last - 1}" in message, message
        assert {name: type(module) for name, module in module_tree(model)} == types_before
        assert {name: p.requires_grad for name, p in model.named_parameters()} == grad_before


def call_and_report(case, stts, model):
    """Outputs and keep masks of one pruning call (a fixed one-video input)."""
    with torch.no_grad():
        if hasattr(case, "make_model"):
            out = stts(**case.inputs(case.video(3, 0), [3]))
            return case.features(out), out.stts.keep_masks
        out = stts(**batch_of(case, model, [case.video(1)]))
        return out.logits, out.stts.keep_masks


def test_applying_stts_again_to_a_base_model_that_is_still_wrapped_is_refused():
    """apply_stts on the bare model object while another STTSModel still wraps it (not through that STTSModel, which
    test_registry.py covers) is refused with a TypeError that says to unload first; the model and the first STTS
    model are unchanged, and after unload() it can be wrapped again. Every family, one report."""
    problems = {}
    for case in CASES + VISION_CASES:
        model = make_model(case)
        first = stts_of(model, case, prune_ratio=RATIO)
        expected, expected_masks = call_and_report(case, first, model)
        types = {name: type(module) for name, module in module_tree(model)}
        try:
            stts_of(model, case, prune_ratio=0.25)
            problems[case.name] = "accepted"
        except TypeError as error:
            if "unload" not in str(error):
                problems[case.name] = f"TypeError without a hint to unload: {error}"
        except Exception as error:  # any other failure is the finding
            problems[case.name] = f"{type(error).__name__}: {error}"
        if {name: type(module) for name, module in module_tree(model)} != types:
            problems[case.name] = problems.get(case.name, "") + " (and the model's modules changed)"
            continue
        outputs, masks = call_and_report(case, first, model)
        assert torch.equal(outputs, expected) and all(torch.equal(a, b) for a, b in zip(masks, expected_masks))
        first.unload()
        outputs, masks = call_and_report(case, stts_of(model, case, prune_ratio=RATIO), model)
        assert all(torch.equal(a, b) for a, b in zip(masks, expected_masks))
    assert not problems, "\n".join(f"{name}: {problem}" for name, problem in problems.items())


def test_the_wrappers_follow_the_base_models_mode():
    """apply_stts on a model in eval mode leaves every module in eval mode (and on a model in training mode, every
    module in training mode): the wrappers it inserts take the base model's mode. Every family, one report."""
    problems = {}
    for case in CASES + VISION_CASES:
        for training in (False, True):
            model = make_model(case).train(training)
            stts_of(model, case)
            wrong = [name for name, module in module_tree(model) if module.training != training]
            if wrong:
                problems[f"{case.name} ({'train' if training else 'eval'})"] = wrong[:3]
    assert not problems, "modules in the other mode than their model:\n" + "\n".join(
        f"{name}: {modules}" for name, modules in problems.items()
    )


def test_an_adapter_whose_prune_layer_this_model_cannot_use_is_refused_before_the_model_is_touched(tmp_path):
    """A saved config edited to a prune_layer past this model's last usable block (same family and size, so the
    adapter otherwise fits) is refused by from_pretrained naming the field and the range; the model is unchanged."""
    model = make_model(QWEN2_5_VL)
    stts_of(model, QWEN2_5_VL).save_pretrained(tmp_path)
    config_path = tmp_path / "stts_config.json"
    config_path.write_text(config_path.read_text().replace('"prune_layer": 1', '"prune_layer": 4'))
    fresh = make_model(QWEN2_5_VL)
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    types = {name: type(module) for name, module in module_tree(fresh)}
    with pytest.raises(ValueError, match=r"prune_layer=4.*between 0 and 3"):
        STTSModel.from_pretrained(fresh, str(tmp_path))
    assert {name: type(module) for name, module in module_tree(fresh)} == types
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())
    assert all(p.requires_grad for p in fresh.parameters())


def test_set_prune_ratio_outside_zero_one_is_refused_and_keeps_the_ratio():
    model = make_model(QWEN2_5_VL)
    stts = stts_of(model, QWEN2_5_VL, prune_ratio=0.25)
    for bad in (1.0, -0.1, float("nan"), "0.5"):
        with pytest.raises(STTSConfigError, match="prune_ratio"):
            stts.set_prune_ratio(bad)
        assert stts.stts_config.prune_ratio == 0.25
    out = stts(**batch_of(QWEN2_5_VL, model, [QWEN2_5_VL.video(1)]))
    assert out.stts.units_after == [expected_units(QWEN2_5_VL, model.config, QWEN2_5_VL.videos[1], 0.25)[1]]


def test_scorer_heads_that_do_not_divide_this_vits_width_are_a_config_error():
    """scorer_num_heads is valid on its own but not for a 64-wide ViT: refused by apply_stts as an STTSConfigError
    naming the field and the value, before the model is touched."""
    model = make_model(QWEN2_5_VL)
    with pytest.raises(STTSConfigError) as raised:
        stts_of(model, QWEN2_5_VL, scorer_num_heads=3)
    message = str(raised.value)
    assert "scorer_num_heads" in message and re.search(r"\b3\b", message) and re.search(r"\b64\b", message), message
    assert not stts_modules(model)


@pytest.fixture
def siglip_with_two_by_two_units():
    """A SigLIP tower whose entry prunes 2x2-patch units (`unit_side=2`), registered for this test only."""

    class TwoByTwoSiglipEntry(SiglipVisionEntry):
        name = "reliability_siglip_2x2"
        model_types = ("reliability_siglip_2x2",)
        unit_side = 2

    register_architecture(TwoByTwoSiglipEntry)
    try:
        model = SIGLIP_VISION.make_model()
        model.config.model_type = "reliability_siglip_2x2"
        yield model
    finally:
        _REGISTRY.pop("reliability_siglip_2x2", None)


@pytest.mark.parametrize("side", [42, 70])  # 3x3 and 5x5 patch grids
def test_a_unit_that_does_not_divide_the_frames_grid_is_an_input_error(siglip_with_two_by_two_units, side):
    model = siglip_with_two_by_two_units
    stts = apply_stts(model, STTSConfig(prune_layer=1))
    out = stts(pixel_values=torch.rand(4, 3, 56, 56), frames_per_video=[4])  # a 4x4 grid: 2x2 units fit
    assert out.stts.units_before == [4 * 4]
    grid = side // 14
    with pytest.raises(STTSInputError) as raised:
        stts(pixel_values=torch.rand(4, 3, side, side), frames_per_video=[4])
    message = str(raised.value)
    assert "unit_side=2" in message and f"{grid}x{grid}" in message, message


@pytest.mark.parametrize("case", VARLEN_CASES, ids=repr)
def test_a_video_grid_the_merge_block_does_not_divide_is_an_input_error_before_the_vit(case):
    """video_grid_thw whose patch rows the 2x2 merge block does not divide (never made by a processor, here with
    placeholders and pixels that agree with it) is refused with an STTSInputError naming video_grid_thw, before any
    ViT block runs."""
    model = make_model(case)
    batch = batch_of(case, model, [case.video(1)])
    slots, rows, columns = batch["video_grid_thw"][0].tolist()
    assert rows % 2 == 0 and columns % 2 == 0
    # The same patches, re-read as an odd number of patch rows.
    odd_rows = next(d for d in range(rows - 1, 1, -1) if d % 2 and rows * columns % d == 0)
    odd_columns = rows * columns // odd_rows
    batch["video_grid_thw"] = torch.tensor([[slots, odd_rows, odd_columns]])
    # Placeholders that agree with the grid as STTS counts it (floor of the 2x2 blocks): only the grid is wrong.
    placeholders = find_architecture(model).placeholder_mask(model, batch["input_ids"])[0]
    extra = int(placeholders.sum()) - slots * (odd_rows // 2) * (odd_columns // 2)
    drop = set(torch.nonzero(placeholders).squeeze(1)[-extra:].tolist())
    keep = torch.tensor([i not in drop for i in range(batch["input_ids"].shape[1])])
    for name in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if name in batch:
            batch[name] = batch[name][:, keep]
    stts = stts_of(model, case, prune_ratio=RATIO)
    ran = []
    handle = vision_blocks(model)[0].base_layer.register_forward_pre_hook(lambda module, args: ran.append(1))
    try:
        with pytest.raises(STTSInputError) as raised:
            stts(**batch)
    finally:
        handle.remove()
    assert "video_grid_thw" in str(raised.value) and str(odd_rows) in str(raised.value), str(raised.value)
    assert not ran, "the ViT ran before the inconsistent grid was refused"


# --------------------------------------------------------------------------------------------- 2. inputs
def degenerate_video(kind, case):
    """A video with the dimensions of the case's second video."""
    frames, height, width = case.videos[1]
    shape = (frames, 3, height, width)
    noise_sign = torch.where(torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.5, 1.0, -1.0)
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "identical":
        return case.video(1)[:1].expand(shape).clone()
    if kind == "noise_1e18":  # salt and pepper at the largest magnitude the bare models map to finite logits
        return noise_sign * 1e18
    if kind == "flash_1e18":  # one frame jumps to a huge value and back
        video = case.video(1)
        video[frames // 2] = 1e18
        return video
    raise ValueError(kind)


KINDS = ["zeros", "identical", "noise_1e18", "flash_1e18"]
# SmolVLM drops all-zero images as padding (the bare model too): such a video is refused (test_smolvlm.py).
DEGENERATE = [(case, kind) for case in CASES for kind in KINDS if not (case is SMOLVLM and kind == "zeros")]


@pytest.mark.parametrize(("case", "kind"), DEGENERATE, ids=[f"{c.name}-{k}" for c, k in DEGENERATE])
def test_degenerate_videos_give_finite_scores_losses_and_logits_and_the_exact_budget(case, kind):
    """Blank, identical and extreme-valued videos next to an ordinary one: in training (scorer) and evaluation
    (similarity), scores, aux loss, loss, logits and scorer gradients are finite, the budget is exact and the first
    frame is whole."""
    model = make_model(case)
    video = degenerate_video(kind, case)
    batch = batch_of(case, model, [video, case.video(1, seed=4)], answers=True)
    if kind.endswith("1e18"):  # the largest magnitude the bare models still map to finite logits
        with torch.no_grad():
            assert_finite("the bare model's logits", model(**bare_inputs(batch)).logits)
    expected = [expected_units(case, model.config, case.videos[1])] * 2

    stts = stts_of(model, case, prune_ratio=RATIO).train()
    out = stts(**batch)
    report = out.stts
    assert list(zip(report.units_before, report.units_after)) == expected
    assert all(bool(mask[0].all()) for mask in report.keep_masks)
    for scores in report.scores:
        assert_finite("scores", scores)
        assert bool(((scores >= 0) & (scores <= 1)).all())
    assert report.aux_loss.dtype == torch.float32
    assert_finite("aux loss", report.aux_loss)
    assert_finite("loss", out.loss)
    assert_finite("logits", out.logits)
    out.loss.backward()
    for name, parameter in stts.scorer.named_parameters():
        assert parameter.grad is not None, name
        assert_finite(f"the gradient of {name}", parameter.grad)
    stts.unload()

    similarity = stts_of(model, case, prune_ratio=RATIO, method="similarity")
    with torch.no_grad():
        out = similarity(**batch)
    assert list(zip(out.stts.units_before, out.stts.units_after)) == expected
    assert all(bool(torch.isfinite(scores).all()) for scores in out.stts.scores)
    assert_finite("logits", out.logits)


@pytest.mark.parametrize("case", VISION_CASES, ids=repr)
def test_degenerate_videos_on_vits_alone_give_finite_outputs_and_the_exact_budget(case):
    """The same kinds of video through the ViT-only entries, in training mode with a downstream loss."""
    frames, side = 3, 56
    sign = torch.where(torch.rand(frames, 3, side, side, generator=torch.Generator().manual_seed(1)) > 0.5, 1.0, -1.0)
    flash = case.video(frames, 0)
    flash[1] = 1e18
    videos = {
        "zeros": torch.zeros(frames, 3, side, side),
        "identical": case.video(1, 0).expand(frames, -1, -1, -1).clone(),
        "noise_1e18": sign * 1e18,
        "flash_1e18": flash,
    }
    units = frames * case.units_per_frame
    stts = stts_of(case.make_model(), case, prune_ratio=RATIO).train()
    for kind, video in videos.items():
        inputs = case.inputs(video, [frames])
        with torch.no_grad(), stts.disable_stts():
            assert_finite(f"the bare model's output ({kind})", case.features(stts(**inputs)))
        out = stts(**inputs)
        assert out.stts.units_after == [units - min(math.floor(RATIO * units), units - case.units_per_frame)], kind
        assert bool(out.stts.keep_masks[0][0].all())
        assert out.stts.aux_loss.dtype == torch.float32
        for name, value in (("scores", out.stts.scores[0]), ("aux loss", out.stts.aux_loss)):
            assert_finite(f"{name} ({kind})", value)
        features = case.features(out)
        assert_finite(f"output ({kind})", features)
        (features.float().square().mean() + out.stts.aux_loss).backward()
        for name, parameter in stts.scorer.named_parameters():
            assert_finite(f"the gradient of {name} ({kind})", parameter.grad)
        stts.zero_grad(set_to_none=True)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_a_text_only_batch_is_the_base_model_exactly(case):
    model = make_model(case)
    samples = [Sample(answer=[5, 6]), Sample(prefix=[1, 9, 10], answer=[7])]
    batch = tokenize(samples, lambda sample: [], "left", pad_token_id(model.config))
    prompt = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        bare = model(**batch)
        bare_ids = model.generate(**prompt, max_new_tokens=3, do_sample=False)
        stts = stts_of(model, case)
        out = stts(**batch)
        assert torch.equal(out.logits, bare.logits) and torch.equal(out.loss, bare.loss)
        assert out.stts is None
        assert torch.equal(stts.generate(**prompt, max_new_tokens=3, do_sample=False), bare_ids)


HALF = [(case, dtype) for case in CASES for dtype in (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize(("case", "dtype"), HALF, ids=[f"{c.name}-{str(d)[6:]}" for c, d in HALF])
def test_half_precision_models_train_and_generate_with_an_fp32_scorer_and_aux_loss(case, dtype):
    model = make_model(case).to(dtype)
    batch = batch_of(case, model, [case.video(1)], answers=True)
    batch = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
    stts = stts_of(model, case, prune_ratio=RATIO).train()
    assert all(p.dtype == torch.float32 for p in stts.scorer.parameters())
    out = stts(**batch)
    assert out.logits.dtype == dtype
    assert out.stts.aux_loss.dtype == torch.float32 and all(s.dtype == torch.float32 for s in out.stts.scores)
    assert out.stts.units_after == [expected_units(case, model.config, case.videos[1])[1]]
    for name, value in (("logits", out.logits), ("loss", out.loss), ("aux loss", out.stts.aux_loss)):
        assert_finite(name, value)
    out.loss.backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in stts.scorer.parameters())
    assert any(bool(p.grad.abs().sum() > 0) for p in stts.scorer.parameters())

    stts.eval()
    prompt = {k: v for k, v in batch.items() if k != "labels"}
    generated = stts.generate(**prompt, max_new_tokens=2, do_sample=False)
    assert generated.shape == (1, batch["input_ids"].shape[1] + 2)
    assert torch.equal(generated[:, : batch["input_ids"].shape[1]], batch["input_ids"])


# --------------------------------------------------------------------------------------------- 5. leaks, unload
class _Same:
    """Compares equal to another `_Same` holding the very same object. It keeps the object alive, so that a
    replaced attribute can never look unchanged through a reused id()."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Same) and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)

    def __repr__(self):
        return f"<{type(self.obj).__name__} at {id(self.obj):#x}>"


def _frozen(value, depth=0):
    """A comparable picture of a module attribute: plain values by value, containers element-wise, every other
    object (modules, tensors, hooks, functions) by identity."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth < 3 and isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_frozen(v, depth + 1) for v in value))
    if depth < 3 and isinstance(value, dict):
        return (type(value).__name__, tuple((k, _frozen(v, depth + 1)) for k, v in value.items()))
    if depth < 3 and isinstance(value, (set, frozenset)):
        return (type(value).__name__, frozenset(_frozen(v, depth + 1) for v in value))
    return _Same(value)


def module_fingerprint(model):
    """Every module (by path and identity) with every attribute: parameters, buffers, children, all hook
    dictionaries, flags, and any attribute a wrapper or a call might have left behind. Plus torch's global hooks."""
    modules = {name: (type(m), id(m), {k: _frozen(v) for k, v in vars(m).items()}) for name, m in module_tree(model)}
    global_hooks = {
        name: tuple(getattr(torch_module, name).keys())
        for name in dir(torch_module)
        if name.startswith("_global_") and isinstance(getattr(torch_module, name), dict)
    }
    return modules, global_hooks


def diff(before, after, volatile=frozenset()):
    """Human-readable differences between two fingerprints (empty when equal). `volatile` holds (module, attribute)
    pairs whose VALUE the bare model itself replaces at every call (e.g. Qwen's `rope_deltas`): only their presence
    is compared."""
    (modules_a, hooks_a), (modules_b, hooks_b) = before, after
    lines = [f"global hooks {k}: {hooks_a[k]} -> {hooks_b.get(k)}" for k in hooks_a if hooks_a[k] != hooks_b.get(k)]
    lines += [f"module {k} added" for k in modules_b.keys() - modules_a.keys()]
    lines += [f"module {k} removed" for k in modules_a.keys() - modules_b.keys()]
    for name in sorted(modules_a.keys() & modules_b.keys()):
        (type_a, id_a, attrs_a), (type_b, id_b, attrs_b) = modules_a[name], modules_b[name]
        if (type_a, id_a) != (type_b, id_b):
            lines.append(f"{name or '<root>'}: {type_a.__name__} -> {type_b.__name__}")
        for key in sorted(attrs_a.keys() | attrs_b.keys()):
            value_a, value_b = attrs_a.get(key, "<missing>"), attrs_b.get(key, "<missing>")
            if (name, key) in volatile and "<missing>" not in (value_a, value_b):
                continue
            if value_a != value_b:
                lines.append(f"{name or '<root>'}.{key}: {value_a} -> {value_b}")
    return lines[:20]


def volatile_attributes(model, run):
    """(module, attribute) pairs whose value the BARE model replaces on every call of `run` (after a warm-up)."""
    run()
    first, _ = module_fingerprint(model)
    run()
    second, _ = module_fingerprint(model)
    return frozenset(
        (name, key)
        for name, (_, _, attrs) in first.items()
        for key, value in attrs.items()
        if second[name][2].get(key) != value
    )


def vlm_workload(case, stts, model, batch):
    """Forward, training step, generate, disabled call and a report hook on an STTS-wrapped VLM."""
    with torch.no_grad():
        stts(**batch)
    stts.train()
    stts(**batch_of(case, model, [case.video(1)], answers=True)).loss.backward()
    stts.eval()
    handle = stts.register_report_hook(lambda report: None)
    stts.generate(**batch, max_new_tokens=2, do_sample=False)
    handle.remove()
    with stts.disable_stts(), torch.no_grad():
        stts(**batch)
    stts.zero_grad(set_to_none=True)


def vision_workload(case, stts, model, inputs):
    with torch.no_grad():
        stts(**inputs)
    stts.train()
    out = stts(**inputs)
    (case.features(out).float().square().mean() + out.stts.aux_loss).backward()
    stts.eval()
    with stts.disable_stts(), torch.no_grad():
        stts(**inputs)
    stts.zero_grad(set_to_none=True)


@pytest.mark.parametrize("case", CASES + VISION_CASES, ids=repr)
def test_calls_leave_no_state_on_modules_and_unload_leaves_no_trace(case):
    """Calls (forward, training, generate, disabled) change no attribute of any module of the wrapped model; after
    unload() every module is the original object with exactly its original attributes, hooks (forward, pre-forward,
    backward, state-dict), parameters, buffers and children, torch's global hooks are as before, and the state
    dict, requires_grad and outputs are the bare model's."""
    model = make_model(case)
    if hasattr(case, "make_model"):
        inputs = case.inputs(torch.cat([case.video(3, 0), case.video(2, 1)]), [3, 2])
        bare_call = {k: v for k, v in inputs.items() if k != "frames_per_video"}
        workload = vision_workload

        def outputs():
            with torch.no_grad():
                return case.features(model(**bare_call))

        def bare_workload():
            outputs()
    else:
        inputs = batch_of(case, model, [case.video(1), case.video(1, seed=5)])
        workload = vlm_workload

        def outputs():
            with torch.no_grad():
                return model(**bare_inputs(inputs)).logits

        def bare_workload():
            outputs()
            prompt = bare_inputs(inputs)
            if case is QWEN2_VL:  # the processor's second_per_grid_ts is refused by Qwen2-VL's own generate
                prompt.pop("second_per_grid_ts")
            with torch.no_grad():
                model.generate(**prompt, max_new_tokens=2, do_sample=False)

    volatile = volatile_attributes(model, bare_workload)  # also fills transformers' own lazy caches
    bare = outputs()
    config_before = model.config.to_dict() if hasattr(model, "config") else None
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    grad_before = {name: p.requires_grad for name, p in model.named_parameters()}
    before = module_fingerprint(model)

    stts = stts_of(model, case, prune_ratio=RATIO).eval()  # (see test_the_wrappers_follow_the_base_models_mode)
    wrapped = module_fingerprint(model)
    stts_attributes = {k: _frozen(v) for k, v in vars(stts).items() if k != "training"}
    workload(case, stts, model, inputs)
    changed = diff(wrapped, module_fingerprint(model), volatile)
    assert not changed, changed
    assert {k: _frozen(v) for k, v in vars(stts).items() if k != "training"} == stts_attributes

    assert stts.unload() is model
    changed = diff(before, module_fingerprint(model), volatile)
    assert not changed, changed
    assert not stts_modules(model)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grad_before
    assert all(p.grad is None for p in model.parameters())
    state = model.state_dict()
    assert list(state) == list(state_before) and all(torch.equal(state[k], state_before[k]) for k in state)
    if config_before is not None:
        assert model.config.to_dict() == config_before
    assert torch.equal(outputs(), bare)


def _capture_passes(stts, case):
    """Record (weakly) every pruning pass that runs, from a hook on the wrapper of block prune_layer + 1."""
    passes = []
    block = stts.architecture.get_vision_blocks(stts.transformers_model)[case.prune_layer + 1]
    handle = block.register_forward_pre_hook(lambda module, args: passes.append(weakref.ref(active_pass())))
    return passes, handle


def _loss_refs(report, training: bool) -> list:
    """Weak references to the report's aux loss and logit penalty, which only training mode computes."""
    losses = (report.aux_loss, report.logit_penalty)
    if not training:
        assert losses == (None, None), "eval mode computed a training-only loss"
        return []
    return [weakref.ref(loss) for loss in losses]


@pytest.mark.parametrize("case", CASES + VISION_CASES, ids=repr)
def test_nothing_keeps_a_calls_pass_report_or_outputs_alive(case):
    """After a call returns and its outputs are dropped, its pruning pass, report, aux loss and logits are freed: no
    module, context or global keeps per-call state (forward in eval and training, and generate)."""
    model = make_model(case)
    stts = stts_of(model, case, prune_ratio=RATIO)
    passes, handle = _capture_passes(stts, case)
    survivors = []
    if hasattr(case, "make_model"):
        inputs = case.inputs(case.video(3, 0), [3])
        for training in (False, True):
            stts.train(training)
            out = stts(**inputs)
            survivors += [weakref.ref(out), weakref.ref(out.stts), *_loss_refs(out.stts, training)]
            del out
    else:
        batch = batch_of(case, model, [case.video(1)], answers=True)
        for training in (False, True):
            stts.train(training)
            out = stts(**batch)
            if training:
                out.loss.backward()
            survivors += [weakref.ref(out.logits), weakref.ref(out.stts), *_loss_refs(out.stts, training)]
            del out
        stts.eval()
        prompt = {k: v for k, v in batch.items() if k != "labels"}
        generated = stts.generate(**prompt, max_new_tokens=2, do_sample=False)
        survivors.append(weakref.ref(generated))
        del generated
    handle.remove()
    gc.collect()
    assert len(passes) == (2 if hasattr(case, "make_model") else 3)
    assert all(ref() is None for ref in passes), "a pruning pass outlived its call"
    assert all(ref() is None for ref in survivors), "a call's output or report is kept alive"
    assert active_pass() is None


def live_tensors():
    """(count, elements) of the tensors alive in the process (type() rather than isinstance(): no proxy object's
    __class__ gets called)."""
    gc.collect()
    tensors = [o for o in gc.get_objects() if issubclass(type(o), torch.Tensor)]
    return len(tensors), sum(t.numel() for t in tensors if not t.is_meta)


@pytest.mark.parametrize("case", [QWEN2_5_VL, INTERNVL, MOLMO2, TIMM_VIT], ids=repr)
def test_repeated_calls_do_not_grow_the_live_tensors(case):
    """Memory does not grow with the number of calls: after a warm-up, 5 more rounds of forward, training step
    and generate leave exactly as many live tensors (and elements) as 2 rounds did."""
    model = make_model(case)
    stts = stts_of(model, case, prune_ratio=RATIO)
    if hasattr(case, "make_model"):
        inputs = case.inputs(case.video(3, 0), [3])

        def one_round():
            with torch.no_grad():
                stts(**inputs)
            stts.train()
            out = stts(**inputs)
            (case.features(out).float().square().mean() + out.stts.aux_loss).backward()
            stts.eval()
    else:
        batch = batch_of(case, model, [case.video(1)], answers=True)
        prompt = {k: v for k, v in batch.items() if k != "labels"}

        def one_round():
            with torch.no_grad():
                stts(**batch)
            stts.train()
            stts(**batch).loss.backward()
            stts.eval()
            stts.generate(**prompt, max_new_tokens=2, do_sample=False)

    for _ in range(2):  # warm-up: lazily built caches, the scorer's .grad tensors
        one_round()
    after_two = live_tensors()
    for _ in range(5):
        one_round()
    assert live_tensors() == after_two


# --------------------------------------------------------------------------------------------- 7. determinism
def assert_a_real_choice(report):
    """The kept set of every video is chosen by the scores: fewer units pruned than could be."""
    for mask in report.keep_masks:
        pruned, prunable = int((~mask).sum()), mask[1:].numel()
        assert 0 < pruned < prunable


@pytest.mark.parametrize("method", ["scorer", "similarity", "random"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_eval_pruning_is_deterministic_across_calls_and_batch_composition(case, method):
    """In eval mode a video's kept set and scores depend on nothing but the video: the same on a repeated call, and
    with another partner video in another batch position (the random baseline draws from its seed)."""
    model = make_model(case)
    video, partner = case.video(1), case.video(1, seed=9)
    stts = stts_of(model, case, prune_ratio=CHOICE_RATIO, method=method)
    with torch.no_grad():
        first = stts(**batch_of(case, model, [video]))
        again = stts(**batch_of(case, model, [video]))
        swapped = stts(**batch_of(case, model, [partner, video]))
    assert_a_real_choice(first.stts)
    assert torch.equal(again.logits, first.logits)
    assert torch.equal(again.stts.keep_masks[0], first.stts.keep_masks[0])
    assert torch.equal(again.stts.scores[0], first.stts.scores[0])
    assert torch.equal(swapped.stts.keep_masks[1], first.stts.keep_masks[0])
    torch.testing.assert_close(swapped.stts.scores[1], first.stts.scores[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", [QWEN2_5_VL, LLAVA_ONEVISION, MOLMO2], ids=repr)
def test_the_random_baseline_follows_its_seed_in_eval_and_torchs_generator_in_training(case):
    model = make_model(case)
    batch = batch_of(case, model, [case.video(1), case.video(1, seed=9)])

    def draw(stts):
        """The random scores of both videos and the kept sets they give."""
        with torch.no_grad():
            report = stts(**batch).stts
        assert_a_real_choice(report)
        return torch.cat([s.flatten() for s in report.scores]), torch.cat([m.flatten() for m in report.keep_masks])

    seeded = stts_of(model, case, prune_ratio=CHOICE_RATIO, method="random", seed=3)
    scores, keep = draw(seeded)
    again_scores, again_keep = draw(seeded)
    assert torch.equal(again_scores, scores) and torch.equal(again_keep, keep)
    half = len(keep) // 2  # one seed, one draw per video: two same-size videos get the same draw
    assert torch.equal(scores[:half], scores[half:]) and torch.equal(keep[:half], keep[half:])
    seeded.unload()
    other = stts_of(model, case, prune_ratio=CHOICE_RATIO, method="random", seed=4)
    assert not torch.equal(draw(other)[0], scores)
    other.unload()

    stts = stts_of(model, case, prune_ratio=CHOICE_RATIO, method="random", seed=3).train()
    draws = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        draws.append(draw(stts))
    assert torch.equal(draws[0][0], draws[1][0]) and torch.equal(draws[0][1], draws[1][1])
    assert not torch.equal(draws[0][0], draws[2][0])
    assert not torch.equal(draws[0][0][:half], draws[0][0][half:])  # training draws every video anew


# --------------------------------------------------------------------------------------------- 6. properties
@st.composite
def varlen_sequences(draw):
    """A packed ViT sequence: per video, frames of units of `patches` tokens (units possibly permuted, as Qwen's
    window order does), windows of consecutive tokens inside each frame, and a kept set."""
    videos = draw(st.integers(1, 3))
    frames = tuple(draw(st.integers(1, 4)) for _ in range(videos))
    units = tuple(draw(st.integers(1, 6)) for _ in range(videos))
    patches = draw(st.integers(1, 4))
    layout = VideoLayout(frames, units, patches)
    order = []  # unit of every slot: within each frame, a permutation of its units
    for frame, start in enumerate(torch.tensor([0, *layout.frame_of_unit.bincount().tolist()]).cumsum(0)[:-1].tolist()):
        count = int((layout.frame_of_unit == frame).sum())
        order += [start + i for i in draw(st.permutations(list(range(count))))]
    window_size = draw(st.integers(1, 4))
    slot_window, window, previous_frame = [], -1, None
    for slot, unit in enumerate(order):
        frame = int(layout.frame_of_unit[unit])
        if frame != previous_frame or slot % window_size == 0:
            window += 1
        slot_window.append(window)
        previous_frame = frame
    ratio = draw(st.floats(0.0, 0.99))
    scores = torch.tensor(draw(st.lists(st.floats(0, 1), min_size=layout.num_units, max_size=layout.num_units)))
    return layout, torch.tensor(order), torch.tensor(slot_window), ratio, scores


@settings(max_examples=60, deadline=None)
@given(varlen_sequences())
def test_varlen_pruning_keeps_every_kept_token_once_in_order_and_never_merges_segments(spec):
    layout, unit_of_slot, window_of_slot, ratio, scores = spec
    patches = layout.patches_per_unit
    token_unit = unit_of_slot.repeat_interleave(patches)
    segments = {"frame": layout.frame_of_unit[token_unit], "window": window_of_slot.repeat_interleave(patches)}
    tokens = VarlenTokens(token_unit=token_unit, num_units=layout.num_units, segments=segments)
    keep = select_units(scores, layout, ratio)
    pruned = tokens.prune(keep)
    kept = pruned.kept_tokens.tolist()
    # Exactly the tokens of kept units, each once, in sequence order; the budget is exact per video.
    assert kept == [i for i, unit in enumerate(token_unit.tolist()) if bool(keep[unit])]
    assert len(kept) == int(keep.sum()) * patches
    assert bool(keep[layout.is_first_frame].all())
    # Every re-measured segment holds kept tokens of one original segment only, and all of them.
    for kind, segment in segments.items():
        cu = pruned.cu_seqlens[kind].tolist()
        assert cu[0] == 0 and cu[-1] == len(kept) and all(a < b for a, b in itertools.pairwise(cu))
        kept_segment = segment[pruned.kept_tokens].tolist()
        pieces = [kept_segment[a:b] for a, b in itertools.pairwise(cu)]
        assert all(len(set(piece)) == 1 for piece in pieces)
        assert len({piece[0] for piece in pieces}) == len(pieces)


@st.composite
def frame_batches(draw):
    """Frames as a batch: prefix tokens (never pruned) then square-ish units of patches, and a kept set."""
    videos = draw(st.integers(1, 3))
    frames = tuple(draw(st.integers(1, 4)) for _ in range(videos))
    units_per_frame = draw(st.integers(1, 5))
    patches = draw(st.integers(1, 3))
    prefix = draw(st.integers(0, 2))
    layout = VideoLayout(frames, (units_per_frame,) * videos, patches)
    unit_in_frame = torch.arange(units_per_frame).repeat_interleave(patches)
    unit_in_frame = unit_in_frame[torch.tensor(draw(st.permutations(list(range(len(unit_in_frame))))))]
    first_unit = torch.arange(layout.num_frames)[:, None] * units_per_frame
    patch_units = first_unit + unit_in_frame[None, :]
    token_unit = torch.cat([torch.full((layout.num_frames, prefix), -1), patch_units], dim=1).flatten()
    ratio = draw(st.floats(0.0, 0.99))
    scores = torch.tensor(draw(st.lists(st.floats(0, 1), min_size=layout.num_units, max_size=layout.num_units)))
    return layout, token_unit, prefix + units_per_frame * patches, ratio, scores


@settings(max_examples=60, deadline=None)
@given(frame_batches())
def test_frame_batch_pruning_packs_exactly_the_kept_patches_and_the_prefix_tokens(spec):
    """Selection -> FrameTokens -> RowPacking: prefix tokens always stay, a pruned unit's patches never reach the
    packed rows, every kept patch appears once, no row exceeds its capacity or mixes frames in attention, and
    scatter-back restores every kept patch."""
    layout, token_unit, tokens_per_frame, ratio, scores = spec
    keep = select_units(scores, layout, ratio)
    packing = FrameTokens(token_unit=token_unit, num_units=layout.num_units, tokens_per_frame=tokens_per_frame).prune(
        keep
    )
    kept_tokens = [i for i, unit in enumerate(token_unit.tolist()) if unit < 0 or bool(keep[unit])]
    assert sorted(packing.source[packing.valid].tolist()) == kept_tokens
    assert packing.source.shape[1] == tokens_per_frame and packing.num_rows <= layout.num_frames
    hidden = torch.randn(layout.num_frames, tokens_per_frame, 2)
    restored = packing.unpack(packing.pack(hidden), torch.zeros_like(hidden)).flatten(0, 1)
    assert torch.equal(restored[kept_tokens], hidden.flatten(0, 1)[kept_tokens])
    allowed = packing.attention_mask(torch.float32)[:, 0] == 0
    same_frame = packing.frame[:, :, None] == packing.frame[:, None, :]
    assert torch.equal(allowed, same_frame)
