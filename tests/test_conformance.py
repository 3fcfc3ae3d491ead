"""The conformance suite: every registry entry must pass all of it (in the spirit of PEFT's common tester).

A new family gets the whole suite by adding its `FamilyCase` (from `stts_adapter.testing.<family>`) to CASES.
The bare model is the oracle: STTS disabled must equal it bit for bit, pruning nothing through the pruning path must
reproduce it, and generate must equal a greedy loop of full forward passes.

To run it on a case outside the list (a plugin's entry, a family in progress):
    STTS_CONFORMANCE_CASES=my_package.testing:MY_CASE pytest tests/test_conformance.py
"""

import importlib
import os
import warnings

import pytest
import torch

from stts_adapter import STTSConfig, STTSModel, apply_stts, supported_architectures
from stts_adapter.processing import prepare_inputs
from stts_adapter.registry import get_architecture
from stts_adapter.testing import Sample
from stts_adapter.testing.glm4v import GLM4V
from stts_adapter.testing.internvl import INTERNVL
from stts_adapter.testing.llava_next_video import LLAVA_NEXT_VIDEO
from stts_adapter.testing.llava_onevision import LLAVA_ONEVISION
from stts_adapter.testing.molmo2 import MOLMO2
from stts_adapter.testing.qwen import QWEN2_5_VL, QWEN2_VL
from stts_adapter.testing.qwen3_vl import QWEN3_VL
from stts_adapter.testing.smolvlm import SMOLVLM
from stts_adapter.testing.video_llava import VIDEO_LLAVA

CASES = [
    QWEN2_5_VL,
    QWEN2_VL,
    QWEN3_VL,
    GLM4V,
    LLAVA_ONEVISION,
    LLAVA_NEXT_VIDEO,
    VIDEO_LLAVA,
    SMOLVLM,
    INTERNVL,
    MOLMO2,
]


def _extra_cases() -> list:
    """`module:NAME` entries of $STTS_CONFORMANCE_CASES (comma-separated)."""
    cases = []
    for spec in filter(None, os.environ.get("STTS_CONFORMANCE_CASES", "").split(",")):
        module, _, name = spec.strip().partition(":")
        cases.append(getattr(importlib.import_module(module), name))
    return cases


CASES += _extra_cases()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every case's tiny random model, written once with save_pretrained."""
    directories = {}
    for case in CASES:
        torch.manual_seed(0)
        directory = tmp_path_factory.mktemp(case.name)
        case.model_class(case.make_config()).save_pretrained(directory)
        directories[case.name] = directory
    return directories


@pytest.fixture(params=CASES, ids=repr)
def case(request):
    return request.param


@pytest.fixture
def model(case, saved):
    """A fresh copy of the case's tiny model, loaded from disk, in eval mode."""
    return case.model_class.from_pretrained(saved[case.name]).eval()


def samples(case, answers=False, frames_seed=0):
    return [
        Sample(video=case.video(0, frames_seed), answer=[31, 32, 33] if answers else None),
        Sample(
            video=case.video(1, frames_seed), prefix=[1, 14], suffix=[25, 26, 27, 28], answer=[41] if answers else None
        ),
    ]


def batch_of(case, model, answers=False, padding_side="left"):
    return case.build_batch(model.config, samples(case, answers), padding_side)


def expected_pruned(case, config, ratio):
    """floor(ratio x units) per video, the first frame protected, computed from the processor's counts."""
    pruned = []
    for frames, height, width in case.videos:
        slots, per_frame = case.units(config, frames, height, width)
        units = slots * per_frame
        pruned.append(min(int(ratio * units), units - per_frame))
    return pruned


def stts_of(model, case, **config):
    return apply_stts(model, STTSConfig(prune_layer=case.prune_layer, **config))


# --------------------------------------------------------------------------------------------- the oracle
def test_disabled_equals_the_bare_model_exactly(case, model):
    batch = batch_of(case, model, answers=True)
    bare = model(**batch)
    stts = stts_of(model, case, prune_ratio=0.5)
    with stts.disable_stts():
        disabled = stts(**batch)
    assert torch.equal(disabled.logits, bare.logits)
    assert torch.equal(disabled.loss, bare.loss)
    assert disabled.stts is None  # None, not absent: code can test it without hasattr
    assert torch.equal(stts.base_model(**batch).logits, bare.logits)  # the wrapped model called directly


@pytest.mark.parametrize("method", ["scorer", "similarity", "random"])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_pruning_nothing_through_the_pruning_path_reproduces_the_bare_model(case, model, method, mode):
    """prune_ratio=0: the scorer's key bias is off too (no frame loses a unit), in training as in evaluation."""
    batch = batch_of(case, model, answers=True, padding_side="right")
    model.train(mode == "train")
    with torch.no_grad():
        bare = model(**batch)
    out = stts_of(model, case, prune_ratio=0.0, method=method)(**batch)
    assert out.stts.units_after == out.stts.units_before
    real = batch["attention_mask"].bool()
    assert out.logits.shape == bare.logits.shape
    torch.testing.assert_close(out.logits[real], bare.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.stts.lm_loss, bare.loss, atol=1e-5, rtol=1e-5)


def frame_of_vit_token(stts, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The frame (in the report's order) of every ViT token of a block's output, flattened, and the layout's
    frames."""
    entry = stts.architecture
    layout = entry.video_layout(model, batch)
    tokens = entry.vision_tokens(model, batch, layout)
    if hasattr(tokens, "tokens_per_frame"):  # frames as a batch: (frames, tokens, dim)
        return torch.arange(len(tokens.token_unit)) // tokens.tokens_per_frame, layout
    return layout.frame_of_unit[tokens.token_unit.cpu()], layout  # one packed sequence, in the ViT's order


def test_a_frame_that_keeps_every_unit_runs_the_biased_block_as_the_bare_model(case, model):
    """The soft key bias anticipates pruning: a frame that loses nothing gets none, so block k+1 computes it exactly
    as the bare model does, while the frames that lose units are biased."""
    batch = batch_of(case, model)
    stts = stts_of(model, case, prune_ratio=0.25)
    first = stts(**batch).stts
    boost = torch.cat(
        [
            torch.arange(m.numel()).view(m.shape)[1] + offset
            for m, offset in zip(first.keep_masks, torch.tensor([0, *[m.numel() for m in first.keep_masks]]).cumsum(0))
        ]
    )  # every unit of each video's frame 1

    def keep_frame_one(module, args, logits):
        return logits.index_add(0, boost, torch.full((len(boost),), 30.0)) if logits.numel() else logits

    block = stts.architecture.get_vision_blocks(model)[case.prune_layer + 1].base_layer
    outputs = []
    hooks = [
        stts.scorer.register_forward_hook(keep_frame_one),
        block.register_forward_hook(lambda module, args, output: outputs.append(_hidden(output).detach())),
    ]
    report = stts(**batch).stts
    with stts.disable_stts():
        model(**batch)
    for hook in hooks:
        hook.remove()
    pruned, bare = (o.reshape(-1, o.shape[-1]) for o in outputs)
    frame_of_token, layout = frame_of_vit_token(stts, model, batch)
    kept_whole = torch.cat([m.all(dim=1) for m in report.keep_masks])  # per frame
    first_frames = layout.is_first_frame[torch.tensor(layout.video_offsets[:-1])]
    assert any(bool(m[1].all()) for m in report.keep_masks if len(m) > 2)  # frame 1 of a longer video kept whole
    for frame in range(layout.num_frames):
        tokens = frame_of_token == frame
        if kept_whole[frame]:
            torch.testing.assert_close(pruned[tokens], bare[tokens], atol=1e-5, rtol=1e-5)
        else:
            assert not torch.allclose(pruned[tokens], bare[tokens], atol=1e-5)  # biased
    assert bool(first_frames.all())


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


# --------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_exact_pruned_counts_in_the_llm_and_the_vit(case, model, ratio):
    batch = batch_of(case, model)
    expected = expected_pruned(case, model.config, ratio)
    stts = stts_of(model, case, prune_ratio=ratio)
    blocks = stts.architecture.get_vision_blocks(model)
    seen = []
    handle = blocks[case.prune_layer + 2].base_layer.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].shape)
    )
    out = stts(**batch)
    handle.remove()

    assert [b - a for b, a in zip(out.stts.units_before, out.stts.units_after)] == expected
    real_before, real_after = batch["attention_mask"].sum(1).tolist(), out.stts.attention_mask.sum(1).tolist()
    assert [b - a for b, a in zip(real_before, real_after)] == expected
    assert out.logits.shape[1] == max(real_after)

    kept_tokens = sum(out.stts.units_after) * case.vit_tokens_per_unit
    frames = sum(mask.shape[0] for mask in out.stts.keep_masks)
    (shape,) = seen
    if case.packs_rows:  # (rows, tokens_per_frame, dim): room for every kept token, at most one row per frame
        rows, tokens_per_frame = shape[0], shape[1]
        assert rows <= frames and rows * tokens_per_frame >= kept_tokens
        if ratio >= 0.5:  # most frames keep at most half their tokens and pair up: the ViT really runs fewer rows
            assert rows < frames
    else:  # one packed sequence of exactly the kept tokens
        assert shape[0] == kept_tokens
    for mask in out.stts.keep_masks:
        assert bool(mask[0].all())  # the first frame is whole


def test_prune_ratio_zero_prunes_nothing(case, model):
    batch = batch_of(case, model)
    out = stts_of(model, case, prune_ratio=0.0)(**batch)
    assert out.stts.units_after == out.stts.units_before
    assert out.logits.shape[1] == batch["input_ids"].shape[1]


def test_a_one_frame_video_works_and_is_not_pruned(case, model):
    video = Sample(video=case.video(0)[: case.one_frame], answer=[5])
    batch = case.build_batch(model.config, [video], "left")
    stts = stts_of(model, case, prune_ratio=0.5).train()
    out = stts(**batch)
    assert out.stts.units_after == out.stts.units_before
    assert out.stts.aux_loss.item() == 0.0
    assert torch.isfinite(out.loss)
    out.loss.backward()


# --------------------------------------------------------------------------------------------- batches
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_invariance(case, model, padding_side):
    stts = stts_of(model, case, prune_ratio=0.5)
    pair = samples(case)
    together = stts(**case.build_batch(model.config, pair, padding_side))
    for row, sample in enumerate(pair):
        alone = stts(**case.build_batch(model.config, [sample], padding_side))
        in_batch = together.logits[row][together.stts.attention_mask[row].bool()]
        torch.testing.assert_close(in_batch, alone.logits[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(together.stts.keep_masks[row], alone.stts.keep_masks[0])


def greedy_loop(stts, batch, new_tokens: int) -> torch.Tensor:
    """`new_tokens` greedy steps of full STTS forwards (the oracle of `generate`)."""
    loop = dict(batch)
    for _ in range(new_tokens):
        next_token = stts(**loop).logits[:, -1].argmax(-1, keepdim=True)
        loop["input_ids"] = torch.cat([loop["input_ids"], next_token], 1)
        loop["attention_mask"] = torch.cat([loop["attention_mask"], torch.ones_like(next_token)], 1)
        if "mm_token_type_ids" in loop:
            types = loop["mm_token_type_ids"]
            loop["mm_token_type_ids"] = torch.cat([types, torch.zeros_like(next_token, dtype=types.dtype)], 1)
    return loop["input_ids"]


def test_generate_equals_a_greedy_loop_of_full_forwards(case, model):
    stts = stts_of(model, case, prune_ratio=0.5)
    batch = batch_of(case, model, padding_side="left")
    generated = stts.generate(**batch, max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert torch.equal(generated, greedy_loop(stts, batch, 5))
    assert torch.equal(generated[:, : batch["input_ids"].shape[1]], batch["input_ids"])  # the unpruned prompt


# --------------------------------------------------------------------------------------------- training
def test_gradients_reach_every_scorer_parameter_from_each_loss_and_never_the_base(case, model):
    batch = batch_of(case, model, answers=True)
    stts = stts_of(model, case, prune_ratio=0.5, aux_loss_weight=0.0).train()
    out = stts(**batch)
    out.loss.backward()  # the LM loss alone
    for name, parameter in stts.scorer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no LM gradient for {name}"
    assert all(p.grad is None for p in stts.base_model.parameters())

    stts.zero_grad(set_to_none=True)
    stts(**batch).stts.aux_loss.backward()  # the temporal auxiliary loss alone
    for name, parameter in stts.scorer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no aux gradient for {name}"
    assert all(p.grad is None for p in stts.base_model.parameters())


def test_the_llm_key_bias_trains_the_scorer_without_changing_the_loss(case, model):
    """The LLM key bias alone (no aux loss, no ViT key bias) gives every scorer parameter a gradient and leaves the
    loss as it is, whatever else the family's placeholders hold (a newline, a CLS, image tiles)."""
    batch = batch_of(case, model, answers=True)
    options = dict(prune_ratio=0.5, aux_loss_weight=0.0, key_bias=False)
    losses = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        stts = stts_of(model, case, llm_key_bias_weight=weight, **options).train()
        out = stts(**batch)
        out.loss.backward()
        losses[weight] = out.loss.detach()
        gradients = {name: p.grad for name, p in stts.scorer.named_parameters()}
        stts.unload()
    torch.testing.assert_close(losses[1.0], losses[0.0])
    for name, gradient in gradients.items():  # the weight-1 run's: the LLM key bias is its only LM path
        assert gradient is not None and gradient.abs().sum() > 0, f"no LLM-key-bias gradient for {name}"


# --------------------------------------------------------------------------------------------- save, unload
def test_save_and_load_round_trip(case, model, saved, tmp_path):
    batch = batch_of(case, model, answers=True)
    stts = stts_of(model, case, prune_ratio=0.5).train()
    optimizer = torch.optim.AdamW(stts.scorer.parameters(), lr=1e-2)
    for _ in range(2):
        stts(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    stts.eval()
    stts.save_pretrained(tmp_path)
    reloaded = STTSModel.from_pretrained(case.model_class.from_pretrained(saved[case.name]), tmp_path)
    with torch.no_grad():
        expected, actual = stts(**batch), reloaded(**batch)
    assert torch.equal(actual.logits, expected.logits)
    assert all(torch.equal(a, b) for a, b in zip(actual.stts.keep_masks, expected.stts.keep_masks))


def test_unload_restores_the_model(case, model):
    batch = batch_of(case, model, answers=True)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_modules = {name: type(m) for name, m in model.named_modules()}
    before_logits = model(**batch).logits
    stts = stts_of(model, case, prune_ratio=0.5)
    assert list(model.state_dict()) == list(before_state)  # wrappers are invisible to checkpoints
    stts(**batch)
    assert stts.unload() is model
    assert {name: type(m) for name, m in model.named_modules()} == before_modules
    state = model.state_dict()
    assert all(torch.equal(state[k], before_state[k]) for k in before_state) and len(state) == len(before_state)
    assert torch.equal(model(**batch).logits, before_logits)


# --------------------------------------------------------------------------------------------- real processors
# Every family runs on its real processor class. A family registered without a processor case must be listed here,
# with the reason, or `test_every_family_runs_on_its_real_processor_or_is_a_listed_gap` fails.
PROCESSOR_GAPS: set[str] = set()
PROCESSOR_CASES = [case for case in CASES if case.make_processor is not None]


def test_every_family_runs_on_its_real_processor_or_is_a_listed_gap():
    missing = {case.name for case in CASES if case.make_processor is None}
    assert missing == PROCESSOR_GAPS & {case.name for case in CASES}, missing ^ PROCESSOR_GAPS


def processor_texts(case):
    return [f"{case.video_prompt} What happens", f"{case.video_prompt} describe it"]


def processor_videos(case, files_in=None):
    """The two videos as decoded frames, or (with a folder) as mp4 files written there, for `prepare_inputs`."""
    if files_in is None:
        return [case.processor_video(0), case.processor_video(1)]
    return [case.processor_video_file(i, files_in / f"video{i}.mp4") for i in range(2)]


@pytest.fixture(params=PROCESSOR_CASES, ids=repr)
def processor_case(request):
    return request.param


@pytest.mark.parametrize("source", ["frames", "mp4 files"])
def test_the_real_processors_output_is_pruned_through_prepare_inputs(processor_case, saved, recwarn, source, tmp_path):
    """Videos of different sizes and lengths in one padded batch, made by the family's real processor from decoded
    frames or from mp4 files (decoded by the transformers video loader): pruning nothing reproduces the bare model
    on them, and at 50% every video loses floor(ratio x units) (first frame kept) and the LLM sequence exactly the
    pruned units' placeholders."""
    case = processor_case
    model = case.model_class.from_pretrained(saved[case.name]).eval()
    processor = case.make_processor(model.config)
    videos = processor_videos(case, tmp_path if source == "mp4 files" else None)
    inputs = prepare_inputs(processor, model, processor_texts(case), videos=videos, return_tensors="pt", padding=True)
    with torch.no_grad():
        bare = model(**{k: v for k, v in inputs.items() if k not in model_only_inputs(case)})
        stts = stts_of(model, case, prune_ratio=0.0)
        nothing = stts(**inputs)
    assert nothing.stts is not None and nothing.stts.units_after == nothing.stts.units_before
    real = inputs["attention_mask"].bool()
    torch.testing.assert_close(nothing.logits[real], bare.logits[real], atol=1e-5, rtol=1e-5)

    stts.set_prune_ratio(0.5)
    report = stts(**inputs).stts
    assert len(report.units_before) == 2
    for before, after, keep in zip(report.units_before, report.units_after, report.keep_masks):
        per_frame = keep.shape[1]
        assert before == keep.numel() and keep.shape[0] > 1
        assert after == before - min(before // 2, before - per_frame)
        assert bool(keep[0].all())
    assert int(real.sum() - report.attention_mask.sum()) == sum(report.units_before) - sum(report.units_after)
    assert not [w for w in recwarn if "STTS" in str(w.message)]


def test_the_processors_own_output_is_pruned_or_warned_about(processor_case, saved):
    """Straight from the processor (no `prepare_inputs`): pruned, or, where the family cannot find the videos in
    it, a warning naming the fix, once, and the bare model's outputs (never a silent bare run)."""
    case = processor_case
    model = case.model_class.from_pretrained(saved[case.name]).eval()
    processor = case.make_processor(model.config)
    inputs = processor(text=processor_texts(case), videos=processor_videos(case), return_tensors="pt", padding=True)
    stts = stts_of(model, case, prune_ratio=0.5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = stts(**inputs)
        again = stts(**inputs)
    notes = [str(w.message) for w in caught if "STTS is not pruning" in str(w.message)]
    if getattr(out, "stts", None) is not None:
        assert out.stts.units_after != out.stts.units_before and not notes
        return
    assert len(notes) == 1 and "prepare_inputs" in notes[0], notes
    with torch.no_grad():
        bare = model(**inputs)
    assert torch.equal(out.logits, bare.logits) and torch.equal(again.logits, bare.logits)


def model_only_inputs(case):
    return set(get_architecture(case.name).stts_only_inputs)


def test_every_registered_family_has_a_conformance_case():
    """The suite is driven by the registry: a family registered without a case here (VLMs) or in
    test_conformance_vision.py (ViTs alone) fails this test."""
    from stts_adapter.registry import get_architecture
    from stts_adapter.testing.vision import VISION_CASES

    covered = {case.name for case in CASES} | {case.name for case in VISION_CASES}
    missing = sorted(set(supported_architectures()) - covered)
    assert not missing, f"registered without a conformance case: {missing}"
    assert all(get_architecture(case.name).has_language_model for case in CASES)


def test_generate_from_video_files_through_the_real_processor_equals_a_greedy_loop(processor_case, saved, tmp_path):
    """From mp4 files to generated text: the family's real processor, STTS at 50%, `generate`."""
    case = processor_case
    model = case.model_class.from_pretrained(saved[case.name]).eval()
    processor = case.make_processor(model.config)
    processor.tokenizer.padding_side = "left"
    videos = processor_videos(case, tmp_path)
    inputs = prepare_inputs(processor, model, processor_texts(case), videos=videos, return_tensors="pt", padding=True)
    stts = stts_of(model, case, prune_ratio=0.5)
    generated = stts.generate(**inputs, max_new_tokens=3, do_sample=False, eos_token_id=None)
    assert torch.equal(generated, greedy_loop(stts, dict(inputs), 3))
    assert stts(**inputs).stts.kept_fraction < 0.75
