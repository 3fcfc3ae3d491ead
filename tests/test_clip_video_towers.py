"""Video-LLaVA and LLaVA-NeXT-Video, the two families whose video tower is a CLIP ViT that keeps a CLS token per frame
(tiny random configs, CPU): the pruned tower equals the bare tower with the pruned keys masked, and several vision
feature layers read before and after pruning. Each family's own unit, LLM side and images are in
test_video_llava.py and test_llava_next_video.py."""

from dataclasses import dataclass

import pytest
import torch

from stts_adapter import STTSConfig, STTSInputError, apply_stts
from stts_adapter.testing import FamilyCase, Sample
from stts_adapter.testing.llava_next_video import LLAVA_NEXT_VIDEO
from stts_adapter.testing.video_llava import (
    VIDEO_LLAVA,
    frame_key_bias,
    masked_tower_reference,
    projector_inputs,
)

PRUNE_LAYER = 1  # block 1 scored, block 2 biased, block 3 pruned and read (vision_feature_layer=-2), block 4 skipped
SIDE = 4  # 56 px frames, patch 14: 4x4 patches + CLS = 17 ViT tokens per frame


def cell_of_patch(side: int) -> torch.Tensor:
    """`(side * side,)` the 2x2 cell of every patch, computed by hand (row-major cells of a row-major grid)."""
    return torch.tensor([(r // 2) * (side // 2) + c // 2 for r in range(side) for c in range(side)])


@dataclass(frozen=True)
class Tower:
    """A CLIP video tower, as these tests see it.

    Args:
        case (`FamilyCase`): the family's conformance case (model class, tiny config, batch builder).
        unit_of_patch (`torch.Tensor` of shape `(SIDE * SIDE,)`): the unit of every patch of a frame, by hand.
        projector_sees_cls (`bool`): the projector gets each frame's CLS and kept patches (Video-LLaVA), or the
            pooled kept units only (LLaVA-NeXT-Video's resampler drops the CLS).
        reference_shape (`tuple[int, ...]`): the bare projector input of the 8 frames of the batch.
    """

    case: FamilyCase
    unit_of_patch: torch.Tensor
    projector_sees_cls: bool
    reference_shape: tuple[int, ...]

    @property
    def patches_per_unit(self) -> int:
        return self.case.vit_tokens_per_unit


TOWERS = {
    "video_llava": Tower(VIDEO_LLAVA, torch.arange(SIDE * SIDE), True, (8, 1 + SIDE * SIDE, 64)),
    "llava_next_video": Tower(LLAVA_NEXT_VIDEO, cell_of_patch(SIDE), False, (8, 4, 64)),
}


@pytest.fixture(params=sorted(TOWERS), scope="module")
def tower(request) -> Tower:
    return TOWERS[request.param]


def fresh(tower: Tower, **overrides) -> torch.nn.Module:
    """The same tiny random model every time (eval mode)."""
    torch.manual_seed(0)
    return tower.case.model_class(tower.case.make_config(**overrides)).eval()


def video_batch(tower: Tower, model: torch.nn.Module, padding_side: str, answers: bool = False) -> dict:
    first = Sample(video=tower.case.video(0), answer=[31, 32] if answers else None)
    second = Sample(video=tower.case.video(1), prefix=[1, 14], suffix=[25, 26, 27], answer=[41] if answers else None)
    return tower.case.build_batch(model.config, [first, second], padding_side)


def stts_of(model: torch.nn.Module, **config):
    return apply_stts(model, STTSConfig(prune_layer=PRUNE_LAYER, **config))


def with_cls(per_patch: torch.Tensor, cls_value: float | bool) -> torch.Tensor:
    """`(frames, 1 + patches)`: `per_patch` (frames, patches) after a CLS column of `cls_value`."""
    cls = torch.full((len(per_patch), 1), cls_value, dtype=per_patch.dtype)
    return torch.cat([cls, per_patch], dim=1)


@pytest.mark.parametrize("method", ["similarity", "scorer"])
def test_the_pruned_tower_equals_the_bare_tower_with_the_pruned_keys_masked(tower, method):
    """The projector's input at the kept tokens is exactly the bare model's when blocks k+2.. cannot see the pruned
    patches (and block k+1's keys carry the scorer's bias): the CLS token takes part in every block, pruned patches
    in none."""
    model = fresh(tower)
    batch = video_batch(tower, model, "left")
    stts = stts_of(model, prune_ratio=0.5, method=method)
    with torch.no_grad():
        outputs = []
        (pruned,) = projector_inputs(model, lambda: outputs.append(stts(**batch)))
    report = outputs[0].stts
    keep_units = torch.cat(report.keep_masks)  # (frames, units), independent of the entry's token bookkeeping
    patches = tower.unit_of_patch
    keep_token = with_cls(keep_units[:, patches], True)  # (frames, 1 + SIDE * SIDE)
    token_bias = None
    if method == "scorer":
        unit_bias = frame_key_bias(stts, report, patches_per_unit=tower.patches_per_unit)
        token_bias = with_cls(unit_bias.view(len(keep_units), -1)[:, patches], 0.0)
    reference = masked_tower_reference(stts, batch, keep_token, token_bias)
    assert reference.shape == tower.reference_shape
    kept = keep_token if tower.projector_sees_cls else keep_units
    # The projector sees the kept tokens only, in placeholder order.
    assert pruned.shape == (int(kept.sum()), 64) and int(kept.sum()) < kept.numel()
    torch.testing.assert_close(pruned, reference[kept], atol=1e-5, rtol=1e-5)
    with stts.disable_stts(), torch.no_grad():
        (bare,) = projector_inputs(model, lambda: model(**batch))
    assert not torch.allclose(pruned, bare[kept], atol=1e-4)  # pruning did change the kept tokens


def test_several_feature_layers_and_a_call_that_asks_for_other_layers(tower):
    """Layers [-3, -1]: block 2 (= k+1, read before pruning) and block 4 (read after it, scattered back)."""
    model = fresh(tower, vision_feature_layer=[-3, -1])
    batch = video_batch(tower, model, "right", answers=True)
    bare = model(**batch)
    stts = stts_of(model, prune_ratio=0.0, method="random")
    out = stts(**batch)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(out.logits[real], bare.logits[real], atol=1e-5, rtol=1e-5)
    assert stts.architecture.capture_blocks(model) == (2, 4)
    with pytest.raises(STTSInputError, match="vision_feature_layer"):
        stts(**batch, vision_feature_layer=-2)
