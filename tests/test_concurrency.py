"""Concurrency and isolation: one STTS model used from several threads, several STTS models in one process.

The state of a call lives in a context variable (never on a module), so threads sharing one model must get exactly
the outputs of running the same calls one after the other, and models with different configs never see each other.
Every comparison is exact (`torch.equal`); nothing here depends on timing: threads start together on a barrier, and
the one ordering that matters (a config change in the middle of a call) is forced with events.
"""

import threading

import pytest
import torch

from stts_adapter import STTSConfig, apply_stts
from stts_adapter.sequence import pad_token_id
from stts_adapter.testing import Sample, tokenize
from stts_adapter.testing.internvl import INTERNVL
from stts_adapter.testing.llava_onevision import LLAVA_ONEVISION
from stts_adapter.testing.qwen import QWEN2_5_VL

CALLS_PER_THREAD = 100


def make_model(case):
    torch.manual_seed(0)
    return case.model_class(case.make_config()).eval()


def stts_of(model, case, **config):
    torch.manual_seed(0)
    return apply_stts(model, STTSConfig(prune_layer=case.prune_layer, **config))


def video_batch(case, model, seeds, padding_side="left"):
    samples = [
        Sample(video=case.video(1, seed=seed), prefix=[1, 11 + i], suffix=[21, 22 + i]) for i, seed in enumerate(seeds)
    ]
    return case.build_batch(model.config, samples, padding_side)


def text_batch(model):
    return tokenize([Sample(), Sample(prefix=[1, 9, 10])], lambda sample: [], "left", pad_token_id(model.config))


def run_together(*workers):
    """Run the workers in threads started together; re-raise the first exception any of them raised."""
    barrier = threading.Barrier(len(workers))
    errors = []

    def wrapped(worker):
        try:
            barrier.wait()
            worker()
        except BaseException as error:  # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=wrapped, args=(worker,)) for worker in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


def signature(out):
    """What a call returns that must not depend on other threads: logits and, when it pruned, the kept sets."""
    masks = [mask.clone() for mask in out.stts.keep_masks] if out.stts is not None else []
    return out.logits.clone(), masks


def same(a, b):
    (logits_a, masks_a), (logits_b, masks_b) = a, b
    return (
        torch.equal(logits_a, logits_b)
        and len(masks_a) == len(masks_b)
        and all(torch.equal(x, y) for x, y in zip(masks_a, masks_b))
    )


@pytest.mark.parametrize("case", [QWEN2_5_VL, INTERNVL], ids=repr)
def test_two_threads_on_one_model_get_exactly_the_sequential_outputs(case):
    """Two threads x 100 calls on one STTS model, mixing pruned calls (different videos, batch sizes and padding),
    calls with STTS disabled in that thread only, and text-only calls: every output equals the output of the same call
    run alone."""
    model = make_model(case)
    stts = stts_of(model, case, prune_ratio=0.5)
    batches = {
        "two videos": video_batch(case, model, [0, 1]),
        "one video, right padded": video_batch(case, model, [2], padding_side="right"),
        "text": text_batch(model),
    }

    def call(name, disabled=False):
        with torch.no_grad():
            if disabled:
                with stts.disable_stts():
                    return signature(stts(**batches[name]))
            return signature(stts(**batches[name]))

    plans = [  # what each thread calls, in turn
        [("two videos", False), ("one video, right padded", True)],
        [("one video, right padded", False), ("text", False), ("two videos", True)],
    ]
    expected = {job: call(*job) for plan in plans for job in plan}
    with torch.no_grad():
        bare = model(**{k: v for k, v in batches["two videos"].items() if k != "pixel_values_video_index"}).logits
    assert torch.equal(expected[("two videos", True)][0], bare)  # disabled really is the bare model
    assert expected[("two videos", False)][1]  # and enabled really prunes
    mismatches = [[] for _ in plans]

    def worker(index):
        plan = plans[index]
        for step in range(CALLS_PER_THREAD):
            job = plan[step % len(plan)]
            if not same(call(*job), expected[job]):
                mismatches[index].append((step, job))

    run_together(*(lambda index=index: worker(index) for index in range(len(plans))))
    assert mismatches == [[], []]
    with torch.no_grad():
        assert stts(**batches["text"]).stts is None


CROSSED = [(case, a, b) for case in (QWEN2_5_VL, INTERNVL, LLAVA_ONEVISION) for a, b in ((0, 0), (1, 0), (0, 1))]


@pytest.mark.parametrize(
    ("case", "first_disabled", "second_disabled"),
    CROSSED,
    ids=[f"{c.name}-{'disabled' if a else 'pruned'}-{'disabled' if b else 'pruned'}" for c, a, b in CROSSED],
)
def test_calls_crossed_in_the_middle_see_nothing_of_each_other(case, first_disabled, second_disabled):
    """A forced interleaving (events, no timing): the first thread stops inside the ViT, after block prune_layer + 1
    when it prunes (its pruned state is live); the second thread starts its call and stops inside the ViT too; the
    first call finishes while the second is half-way, then the second finishes. Each gets exactly its sequential
    result, whether either call prunes or runs with STTS disabled."""
    model = make_model(case)
    stts = stts_of(model, case, prune_ratio=0.5)
    batches = [video_batch(case, model, [0, 1]), video_batch(case, model, [2], padding_side="right")]
    disabled = [bool(first_disabled), bool(second_disabled)]

    def call(index):
        with torch.no_grad():
            if disabled[index]:
                with stts.disable_stts():
                    return signature(stts(**batches[index]))
            return signature(stts(**batches[index]))

    expected = [call(0), call(1)]
    assert [bool(masks) for _, masks in expected] == [not d for d in disabled]
    first_paused, second_paused, first_done = threading.Event(), threading.Event(), threading.Event()
    threads = {}

    def pause_here(index):
        def hook(module, args):
            me = threading.current_thread()
            if index == 0 and me is threads[0] and not first_paused.is_set():
                first_paused.set()
                assert second_paused.wait(timeout=60)
            elif index == 1 and me is threads[1] and not second_paused.is_set():
                second_paused.set()
                assert first_done.wait(timeout=60)

        return hook

    blocks = stts.architecture.get_vision_blocks(model)
    # A pruning first call stops after block prune_layer + 1 (its pruned state is live); a disabled one, and the
    # second call, at block 0.
    first_stop = blocks[0] if disabled[0] else blocks[case.prune_layer + 2]
    handles = [
        first_stop.base_layer.register_forward_pre_hook(pause_here(0)),
        blocks[0].base_layer.register_forward_pre_hook(pause_here(1)),
    ]
    results, errors = [None, None], []

    def run(index):
        try:
            if index == 1:
                assert first_paused.wait(timeout=60)
            results[index] = call(index)
        except BaseException as error:
            errors.append(error)
        finally:
            if index == 0:
                first_done.set()

    try:
        for index in (0, 1):
            threads[index] = threading.Thread(target=run, args=(index,))
        for thread in threads.values():
            thread.start()
        for thread in threads.values():
            thread.join()
    finally:
        for handle in handles:
            handle.remove()
    if errors:
        raise errors[0]
    assert first_paused.is_set() and second_paused.is_set()  # the calls really crossed
    assert same(results[0], expected[0]) and same(results[1], expected[1])


def test_generate_from_two_threads_equals_sequential_generate():
    case = QWEN2_5_VL
    model = make_model(case)
    stts = stts_of(model, case, prune_ratio=0.5)
    prompts = [video_batch(case, model, [0, 1]), video_batch(case, model, [3])]
    expected = [stts.generate(**prompt, max_new_tokens=3, do_sample=False) for prompt in prompts]
    results = [[], []]

    def worker(index):
        for _ in range(8):
            results[index].append(stts.generate(**prompts[index], max_new_tokens=3, do_sample=False))

    run_together(lambda: worker(0), lambda: worker(1))
    for index, outputs in enumerate(results):
        assert all(torch.equal(ids, expected[index]) for ids in outputs)


def test_a_config_change_in_the_middle_of_a_call_applies_from_the_next_call():
    """set_prune_ratio from another thread while a call runs (forced with events, between two ViT blocks) does not
    change that call's budget; the next call uses the new ratio."""
    case = QWEN2_5_VL
    model = make_model(case)
    stts = stts_of(model, case, prune_ratio=0.25)
    batch = video_batch(case, model, [0])
    with torch.no_grad():
        quarter = stts(**batch).stts.units_after
    inside, changed = threading.Event(), threading.Event()

    def pause_in_the_vit(module, args):
        if not inside.is_set():
            inside.set()
            assert changed.wait(timeout=60)

    handle = stts.architecture.get_vision_blocks(model)[0].base_layer.register_forward_pre_hook(pause_in_the_vit)
    results = []

    def pruned_call():
        with torch.no_grad():
            results.append(stts(**batch).stts.units_after)

    def change_ratio():
        assert inside.wait(timeout=60)
        stts.set_prune_ratio(0.75)
        changed.set()

    try:
        run_together(pruned_call, change_ratio)
    finally:
        handle.remove()
    assert results == [quarter]
    with torch.no_grad():
        assert stts(**batch).stts.units_after < quarter


def test_stts_models_with_different_configs_in_one_process_do_not_interfere():
    """Three STTS models (two Qwen2.5-VL with different methods, ratios and prune layers, one InternVL with the
    random baseline) give, interleaved and from concurrent threads, exactly what each gives alone; disabling one in a
    thread and unloading one leave the others unchanged."""
    first_model, second_model, third_model = make_model(QWEN2_5_VL), make_model(QWEN2_5_VL), make_model(INTERNVL)
    qwen_batch = video_batch(QWEN2_5_VL, first_model, [0, 1])
    internvl_batch = video_batch(INTERNVL, third_model, [0, 1])

    def run(stts, batch):
        with torch.no_grad():
            return signature(stts(**batch))

    first = stts_of(first_model, QWEN2_5_VL, prune_ratio=0.25)
    alone_first = run(first, qwen_batch)
    second = apply_stts(second_model, STTSConfig(prune_ratio=0.75, prune_layer=0, method="similarity"))
    alone_second = run(second, qwen_batch)
    third = stts_of(third_model, INTERNVL, prune_ratio=0.5, method="random", seed=5)
    alone_third = run(third, internvl_batch)
    jobs = [(first, qwen_batch, alone_first), (second, qwen_batch, alone_second), (third, internvl_batch, alone_third)]
    assert not same(alone_first, alone_second)  # the two Qwen models really differ
    # Two videos of 2 slots x 12 units: 0.25 prunes 6 units of each, 0.75 is clamped to the 12 after the first slot.
    assert [[int(mask.sum()) for mask in alone[1]] for alone in (alone_first, alone_second)] == [[18, 18], [12, 12]]

    for stts, batch, alone in jobs * 2:  # interleaved, one after the other
        assert same(run(stts, batch), alone)

    mismatches = []

    def worker(stts, batch, alone):
        for _ in range(20):
            if not same(run(stts, batch), alone):
                mismatches.append(stts.stts_config.method)

    run_together(*(lambda job=job: worker(*job) for job in jobs))
    assert not mismatches

    with torch.no_grad():
        bare_first = first_model(**qwen_batch).logits
    disabled = []

    def disabled_first():
        for _ in range(20):
            with first.disable_stts(), torch.no_grad():
                disabled.append(torch.equal(first(**qwen_batch).logits, bare_first))

    run_together(disabled_first, lambda: worker(second, qwen_batch, alone_second))
    assert all(disabled) and len(disabled) == 20 and not mismatches
    assert same(run(first, qwen_batch), alone_first)  # enabled again outside that thread's context

    first.unload()
    assert same(run(second, qwen_batch), alone_second) and same(run(third, internvl_batch), alone_third)
