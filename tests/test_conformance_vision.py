"""The conformance suite for ViTs without a language model (timm, transformers vision towers).

Same oracles as test_conformance.py: STTS disabled equals the bare model on the frames bit for bit, pruning nothing
through the pruning path reproduces it, and the per-video results do not depend on the rest of the batch. A new
entry gets all of it by adding its `VisionCase` to CASES.
"""

import pytest
import torch

from stts_adapter import STTSConfig, STTSModel, apply_stts
from stts_adapter.testing.vision import VISION_CASES

CASES = list(VISION_CASES)
FRAMES = [6, 3]  # two videos of different lengths


@pytest.fixture(params=CASES, ids=repr)
def case(request):
    return request.param


def videos(case, frames=FRAMES, seed=0):
    return torch.cat([case.video(count, seed + index) for index, count in enumerate(frames)])


def stts_of(model, case, **config):
    return apply_stts(model, STTSConfig(prune_layer=case.prune_layer, **config))


def expected_kept(case, frames, ratio):
    units = [count * case.units_per_frame for count in frames]
    return [n - min(int(ratio * n), n - case.units_per_frame) for n in units]


def test_disabled_equals_the_bare_model_on_the_frames(case):
    model = case.make_model()
    inputs = case.inputs(videos(case), FRAMES)
    bare = case.features(model(**{k: v for k, v in inputs.items() if k != "frames_per_video"}))
    stts = stts_of(model, case, prune_ratio=0.5)
    with stts.disable_stts():
        assert torch.equal(case.features(stts(**inputs)), bare)


@pytest.mark.parametrize("method", ["similarity", "random"])
def test_pruning_nothing_through_the_pruning_path_reproduces_the_bare_model(case, method):
    model = case.make_model()
    inputs = case.inputs(videos(case), FRAMES)
    bare = case.features(model(**{k: v for k, v in inputs.items() if k != "frames_per_video"}))
    out = stts_of(model, case, prune_ratio=0.0, method=method)(**inputs)
    torch.testing.assert_close(case.features(out), bare, atol=1e-5, rtol=1e-5)


def test_images_run_untouched(case):
    model = case.make_model()
    inputs = case.inputs(videos(case), FRAMES)
    inputs.pop("frames_per_video")
    bare = case.features(model(**inputs))
    out = stts_of(model, case, prune_ratio=0.5)(**inputs)
    assert torch.equal(case.features(out), bare)
    assert out.stts is None


@pytest.mark.parametrize("ratio", [0.25, 0.5])
def test_exact_counts_and_fewer_vit_rows(case, ratio):
    model = case.make_model()
    stts = stts_of(model, case, prune_ratio=ratio)
    seen = []
    block = stts.architecture.get_vision_blocks(model)[case.prune_layer + 2].base_layer
    handle = block.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    out = stts(**case.inputs(videos(case), FRAMES))
    handle.remove()
    assert out.stts.units_before == [count * case.units_per_frame for count in FRAMES]
    assert out.stts.units_after == expected_kept(case, FRAMES, ratio)
    (shape,) = seen
    tokens_per_frame = case.units_per_frame + case.prefix_tokens
    kept_tokens = sum(out.stts.units_after) + case.prefix_tokens * sum(FRAMES)
    rows = shape[0]
    assert shape[1] == tokens_per_frame and rows * tokens_per_frame >= kept_tokens and rows <= sum(FRAMES)
    if ratio >= 0.5:  # frames keeping half their tokens or less pair up: the ViT really runs fewer rows
        assert rows < sum(FRAMES)
    assert case.features(out).shape[0] == sum(FRAMES)  # the output is per frame again
    assert all(bool(mask[0].all()) for mask in out.stts.keep_masks)


def test_batch_invariance(case):
    stts = stts_of(case.make_model(), case, prune_ratio=0.5)
    together = stts(**case.inputs(videos(case), FRAMES))
    start = 0
    for index, count in enumerate(FRAMES):
        alone = stts(**case.inputs(case.video(count, index), [count]))
        torch.testing.assert_close(
            case.features(together)[start : start + count], case.features(alone), atol=1e-5, rtol=1e-5
        )
        assert torch.equal(together.stts.keep_masks[index], alone.stts.keep_masks[0])
        start += count


def test_a_one_frame_video_is_not_pruned(case):
    stts = stts_of(case.make_model(), case, prune_ratio=0.5)
    out = stts(**case.inputs(case.video(1, 0), [1]))
    assert out.stts.units_after == out.stts.units_before


def test_the_downstream_loss_and_the_aux_loss_each_train_every_scorer_parameter(case):
    stts = stts_of(case.make_model(), case, prune_ratio=0.5).train()
    inputs = case.inputs(videos(case), FRAMES)
    out = stts(**inputs)
    case.features(out).float().square().mean().backward()  # a downstream loss
    for name, parameter in stts.scorer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no downstream gradient for {name}"
    assert all(p.grad is None for p in stts.base_model.parameters())
    stts.zero_grad(set_to_none=True)
    stts(**inputs).stts.aux_loss.backward()
    for name, parameter in stts.scorer.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no aux gradient for {name}"


def test_save_load_round_trip_and_unload(case, tmp_path):
    model = case.make_model()
    inputs = case.inputs(videos(case), FRAMES)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stts = stts_of(model, case, prune_ratio=0.5).train()
    optimizer = torch.optim.AdamW(stts.scorer.parameters(), lr=1e-2)
    for _ in range(2):
        out = stts(**inputs)
        (case.features(out).float().square().mean() + out.stts.aux_loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    stts.eval()
    stts.save_pretrained(tmp_path)
    reloaded = STTSModel.from_pretrained(case.make_model(), tmp_path)
    with torch.no_grad():
        expected, actual = stts(**inputs), reloaded(**inputs)
    assert torch.equal(case.features(actual), case.features(expected))
    assert all(torch.equal(a, b) for a, b in zip(actual.stts.keep_masks, expected.stts.keep_masks))
    assert stts.unload() is model
    assert not any(type(m).__name__.startswith("STTS") for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and len(state) == len(
        model.state_dict()
    )
