"""benchmarks.video_qa: the synthetic video-QA generator, and its --quick mode end to end (train, evaluate,
write the outputs)."""

import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from PIL import Image

from benchmarks.video_qa import data, diagnose, rows, train
from benchmarks.video_qa.evaluate import evaluate
from benchmarks.video_qa.main import earlier_runs, main, parse_args, settings_from
from benchmarks.video_qa.report import machine


def test_every_question_has_at_least_four_answers_so_chance_is_at_most_25_percent():
    for question in range(len(data.QUESTION_TYPES)):
        candidates = data.candidate_tokens(question)
        assert len(set(candidates)) >= 4
        others = {t for q in range(len(data.QUESTION_TYPES)) if q != question for t in data.candidate_tokens(q)}
        assert not others & set(candidates)


@pytest.mark.parametrize("task", ["static", "distractor", "long"])
def test_clips_are_deterministic_and_change_only_after_the_first_slot(task):
    settings = data.TASKS[task]
    clips = data.clip_set("test", 8, settings)
    again = data.clip_set("test", 8, settings)
    slots, units = settings.frames // 2, (settings.side // data.CELL) ** 2
    assert [c.question for c in clips] == [0, 1, 2, 3] * 2  # balanced over question types
    for clip, same in zip(clips, again):
        assert torch.equal(clip.video, same.video) and clip.answer == same.answer
        assert clip.video.shape == (settings.frames, 3, settings.side, settings.side)
        assert clip.changed.shape == (slots, units)
        assert not clip.changed[0].any()  # the first slot (always kept by STTS) holds no event
        assert 0 < clip.changed.sum() <= clip.changed.numel() // 4  # a small changing part
    assert not torch.equal(clips[0].video, data.clip_set("val", 1, settings)[0].video)


def test_objects_are_the_squares_in_view_from_the_slot_they_appear_in():
    """A colour or corner square appears in one unit and stays: `changed` marks that unit in the slot it appears,
    `objects` from then on, in every later slot, unchanged; the rest of the frame shows no object."""
    settings = data.TASKS["distractor"]
    for clip in data.clip_set("val", 8, settings):
        if data.QUESTION_TYPES[clip.question] not in ("colour", "corner"):
            continue
        (slot, unit), *others = clip.changed.nonzero().tolist()
        assert not others  # one unit changes, once
        expected = torch.zeros_like(clip.objects)
        expected[slot:, unit] = True
        assert torch.equal(clip.objects, expected) and not (clip.objects[:, clip.screens]).any()


def test_distractor_screens_change_every_frame_outside_the_answer_and_more_than_the_answer():
    """The screens never cover a unit the question's event changes, change on every frame (so they are not part of
    `changed`, the answer's units), and change more than the answer does: the change rule ranks them first."""
    settings = data.TASKS["distractor"]
    cell = data.CELL
    screen_changes, answer_changes = [], []
    for clip in data.clip_set("val", 16, settings):
        video = clip.video  # (frames, 3, side, side)
        slots = video.reshape(settings.frames // 2, 2, 3, settings.cells, cell, settings.cells, cell)
        # Mean absolute change of each unit from one temporal slot to the next: (slots - 1, units)
        change = (slots[1:] - slots[:-1]).abs().mean(dim=(1, 2, 4, 6)).flatten(1)
        screens = change.min(dim=0).values > 0.1  # units that change between every two slots
        assert int(screens.sum()) == settings.screens and torch.equal(screens, clip.screens)
        assert not (screens[None] & clip.changed).any()
        screen_changes.append(change[:, screens].mean())
        answer_changes.append(change[clip.changed[1:]].mean())
    assert torch.stack(screen_changes).median() > 2 * torch.stack(answer_changes).median()


def test_frame_subsampling_keeps_every_kth_slot_for_the_token_budget():
    video = torch.arange(16.0)[:, None, None, None].expand(16, 3, 84, 84)
    frames, seconds = rows.view(video, rows.ROWS["subsample-50"])
    assert frames[:, 0, 0, 0].tolist() == [0, 1, 4, 5, 8, 9, 12, 13] and seconds == 2
    frames, seconds = rows.view(video, rows.ROWS["subsample-80"])
    assert frames[:, 0, 0, 0].tolist() == [0, 1, 10, 11] and seconds == 5
    frames, seconds = rows.view(video, rows.ROWS["long-baseline"])
    assert frames[:, 0, 0, 0].tolist() == list(range(0, 16, 2)) and seconds == 2


def test_quick_mode_trains_models_that_learn_and_writes_every_output(tmp_path):
    threads = torch.get_num_threads()
    cache = tmp_path / "cache"
    try:
        report = main(["--quick", "--jobs", "1", "--eval-size", "48", "--out", str(tmp_path), "--cache", str(cache)])
    finally:
        torch.set_num_threads(threads)  # the runs set torch's process-wide thread count

    written = json.loads((tmp_path / "video_qa.json").read_text())
    assert written["quick"] is True and written["summary"] == json.loads(json.dumps(report["summary"]))
    runs = {(run["row"], run["regime"]): run for run in written["runs"]}
    assert set(runs) == {(row, regime) for row in ("baseline", "stts-50") for regime in ("frozen", "trained")}
    # The unpruned model sees 8 slots x 9 units; STTS-50% exactly half of them.
    for regime in ("frozen", "trained"):
        assert runs["baseline", regime]["video_tokens"] == 72 and runs["stts-50", regime]["video_tokens"] == 36
    # Frozen: the baseline is the init as is (nothing trained), STTS trained its scorer alone.
    assert "loss_first" not in runs["baseline", "frozen"] and "loss_first" in runs["stts-50", "frozen"]
    # The quick init is too short to answer much better than chance (25%; the benchmark measures accuracy), but it
    # has learned where the answer is: its loss on the answer token is below log(16), a uniform guess among the 16
    # answers of the 4 questions (an untrained model: log(1000), its whole vocabulary).
    for (_, regime), run in runs.items():
        if "loss_first" in run:
            assert run["loss_first"] < math.log(16), run
        if regime == "trained":
            assert run["loss_last"] < run["loss_first"], run  # and fine-tuning lowers it further
    for regime in ("frozen", "trained"):
        scorer = runs["stts-50", regime]
        assert scorer["aux_loss_last"] < scorer["aux_loss_first"]  # the scorer learned the temporal change
        assert scorer["saturated_fraction_last"] < 0.01 and scorer["scorer_grad_norm_last"] > 1e-4  # and still learns
        assert 0 < scorer["recall"] <= 100
        # kept per kind: the answer's is the recall; the static task has no screens
        kept = scorer["kept_by_kind"]
        assert kept["answer"] == pytest.approx(scorer["recall"]) and kept["screen"] is None
    assert runs["baseline", "frozen"]["kept_by_kind"] is None
    # the report names the init its runs start from, by the sha256 of its file
    (init_file,) = cache.iterdir()
    assert written["inits"] == {"static": train.file_sha256(str(init_file))}

    table = (tmp_path / "video_qa.md").read_text()
    assert "| stts-50 | frozen | " in table.split("What the rows keep")[1]
    (tmp_path / "video_qa.md").unlink()
    main(["--render", "--out", str(tmp_path)])  # the table and plot come back from the JSON alone
    assert (tmp_path / "video_qa.md").read_text() == table
    assert "| baseline | 72.0 |" in table and "| stts-50 | 36.0 |" in table
    assert "STTS-50% within 1 point of the baseline" in table and "cores" in table
    # the glance table: the static 50% column holds each regime's means; rows that did not run show "-"
    for regime in ("frozen", "trained"):
        stts, baseline = (report_row(report, name, regime)["accuracy_mean"] for name in ("stts-50", "baseline"))
        assert f"| {regime} | STTS, default | {stts:.1f} | - | - | - | - |" in table
        assert f"| {regime} | unpruned baseline | {baseline:.1f} | {baseline:.1f} | - | - | - |" in table
    for picture in ("video_qa.png", "kept_units.png"):
        with Image.open(tmp_path / picture) as image:
            assert image.format == "PNG" and min(image.size) > 100


def report_row(report: dict, name: str, regime: str) -> dict:
    """The summary of one row in one regime."""
    return next(s for s in report["summary"] if (s["name"], s["regime"]) == (name, regime))


def test_the_init_is_cached_by_its_settings_and_reused(tmp_path, monkeypatch):
    """A second run with the same settings loads the cached init (no training); other settings get their own."""
    settings = train.TrainSettings(pretrain_steps=2, batch_size=2)
    path = train.pretrain("static", settings, str(tmp_path))
    assert path.endswith(".safetensors") and [p.name for p in tmp_path.iterdir()] == [Path(path).name]

    def no_training(*args, **kwargs):
        raise AssertionError("the cached init was trained again")

    monkeypatch.setattr(train, "train_steps", no_training)
    assert train.pretrain("static", settings, str(tmp_path)) == path
    other = train.init_path("static", train.TrainSettings(pretrain_steps=3, batch_size=2), str(tmp_path))
    assert other != path
    assert train.init_path("distractor", settings, str(tmp_path)) != path

    def brighter_stream(*args):  # the generator's code changes: the cached init is stale even if no setting moved
        for clip in data.clip_stream(*args):
            yield replace(clip, video=clip.video * 0.5)

    monkeypatch.setattr(train, "clip_stream", brighter_stream)
    assert train.init_path("static", settings, str(tmp_path)) != path
    monkeypatch.undo()
    model = train.build_model(rows.ROWS["baseline"], "frozen", 0, path, settings)
    assert not any(p.requires_grad for p in model.parameters())


def test_merge_refuses_a_report_made_from_other_inits(tmp_path):
    """--merge adds runs to a report only when they start from the very inits its runs did: the same settings give
    another init under another torch or transformers version, and mixed inits would make the rows incomparable."""
    args = parse_args(["--merge", "--rows", "baseline", "--out", str(tmp_path)])
    settings, seeds, ours = settings_from(args), [0, 1, 2], {"static": "a" * 64}
    report = {
        "train": asdict(settings),
        "eval_split": "test",
        "quick": False,
        "runs": [{"row": "baseline", "regime": "frozen", "seed": seed} for seed in seeds],
        "inits": dict(ours),
        "machine": machine(),
    }
    (tmp_path / "video_qa.json").write_text(json.dumps(report))
    assert earlier_runs(args, settings, seeds, ours)["inits"] == ours
    with pytest.raises(SystemExit, match="other inits"):
        earlier_runs(args, settings, seeds, {"static": "b" * 64})
    # A task the report has no runs of yet brings an init it has not recorded: the same machine vouches for it.
    assert earlier_runs(args, settings, seeds, {**ours, "distractor": "c" * 64})
    (tmp_path / "video_qa.json").write_text(json.dumps({**report, "machine": "another CPU"}))
    with pytest.raises(SystemExit, match="was made on another CPU"):
        earlier_runs(args, settings, seeds, {**ours, "distractor": "c" * 64})
    del report["inits"]  # a report that did not record its inits cannot vouch for them
    (tmp_path / "video_qa.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match="other inits"):
        earlier_runs(args, settings, seeds, ours)


def test_diagnose_sorts_units_by_kind_and_measures_each_loss_terms_pull_on_the_logits(tmp_path):
    """On a distractor batch: the kinds are the clips' own answer, object and screen units; the penalty's pull is its
    closed form; the answer units' kept share is the recall that `evaluate` measures in eval mode."""
    settings = train.TrainSettings(distractor_pretrain_steps=2, batch_size=2, eval_batch_size=4)
    init = train.pretrain("distractor", settings, str(tmp_path))
    weight = 0.01
    row = rows.ROWS["distractor-stts-50-upper"]
    row = replace(row, options=(*row.options, ("logit_penalty_weight", weight)))
    model = train.build_model(row, "frozen", 0, init, settings)
    clips = data.clip_set("val", 4, data.TASKS["distractor"])
    kinds = torch.stack([data.unit_kinds(clip) for clip in clips])
    slots = kinds.shape[1]
    assert (kinds[:, 0] == -1).all()
    assert int((kinds == 0).sum()) == sum(int(clip.changed.sum()) for clip in clips)
    # the squares the events drew: visible where they changed and in later slots (never on a screen)
    objects = torch.stack([clip.objects for clip in clips])[:, 1:]
    assert int((kinds == 1).sum()) == int((objects & ~torch.stack([clip.changed for clip in clips])[:, 1:]).sum()) > 0
    assert int((kinds == 2).sum()) == len(clips) * (slots - 1) * data.TASKS["distractor"].screens

    mode = model.training
    result = diagnose.probe(model, clips, row)
    assert set(result.pulls) == {"lm", "aux", "penalty"} and model.training == mode  # the mode it had
    # mean(logit^2) over every logit: d/dlogit = 2 logit / count
    torch.testing.assert_close(result.pulls["penalty"], -weight * 2 * result.logits / result.logits.numel())
    assert result.pulls["lm"].abs().max() > 0 and result.pulls["aux"].abs().max() > 0
    summary = {row["kind"]: row for row in diagnose.summarise(result, kinds)}
    assert [row["units"] for row in summary.values()] == [int((kinds == k).sum()) for k in range(4)]
    evaluated = evaluate(model, clips, row, settings)
    assert summary["answer"]["kept"] == pytest.approx(evaluated["recall"])
    assert evaluated["kept_by_kind"] == pytest.approx({kind: summary[kind]["kept"] for kind in data.KINDS})
    assert "| answer |" in diagnose.render(list(summary.values()))

    # A training-free rule is probed as evaluated; the change rule drops what stays as it was, squares in view too.
    similarity = rows.ROWS["distractor-similarity-50"]
    model = train.build_model(similarity, "frozen", 0, init, settings)
    mode = model.training
    result = diagnose.probe(model, clips, similarity)
    assert result.pulls == {} and model.training == mode
    kept = {row["kind"]: row["kept"] for row in diagnose.summarise(result, kinds)}
    recall = evaluate(model, clips, similarity, settings)["recall"]
    assert kept["answer"] > 0 and kept["answer"] == pytest.approx(recall)
    assert kept["object"] == kept["static"] == 0 and kept["screen"] > 50


def test_diagnose_options_parse_json_values_and_keep_other_text_as_strings():
    assert diagnose.parse_option("logit_penalty_weight=0.001") == ("logit_penalty_weight", 0.001)
    assert diagnose.parse_option("key_bias=false") == ("key_bias", False)
    assert diagnose.parse_option("aux_loss=bce_upper") == ("aux_loss", "bce_upper")
