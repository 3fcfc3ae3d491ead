"""Accuracy of STTS on synthetic video-QA tasks: the paper's table in miniature, and where a learned scorer must
beat the training-free rule.

Every video is a textured scene with sensor noise, 84x84 px (3x3 units per temporal slot); the answer lives in the
few units that change after the first slot: the colour of a square that appears, the direction a square moves in,
how many squares flash, which corner a square appears in (4 answers each: chance is 25%). Three tasks (`TASKS`):

- static: nothing else changes, so "keep what changed" (similarity pruning, vLLM's EVS) is close to an oracle;
- distractor: smaller squares, and 4 cells showing a new random picture on every frame (screens) that change more
  than the answer: the change rule must drop some of the answer at 50%;
- long: 32 frames with one-frame flashes, for test-time scaling (STTS on all frames at 50% against the baseline on
  every 2nd frame: the same video tokens).

A small Qwen2.5-VL (random init) is first trained unpruned on each task's videos (the shared init, cached in
`--cache` under a hash of its settings; the long task reuses the static one). Every row then runs in two regimes:
frozen (the base stays the init, only STTS's scorer trains: a user adding STTS to a trained VLM) and trained
(every parameter fine-tuned with the row's pruning: the paper's setting), the same steps and data per seed, and is
evaluated on held-out clips. Rows: baseline; STTS, random, similarity at 50% and 80%; frame subsampling at the same
token budget; on the distractor task the STTS-50 ablations (aux-only, lm-only, the paper's MSE aux loss). Recall:
the answer's changing units (screens excluded) that a row keeps.

Outputs in `--out`: video_qa.json (every run), video_qa.md (the tables and the claims), video_qa.png (accuracy
against the fraction of tokens removed) and kept_units.png / kept_units_distractor.png (kept units of STTS-50 with
the base frozen, on two test clips).

    python -m benchmarks.video_qa                          # everything (3 seeds), one worker per core
    python -m benchmarks.video_qa --quick --out /tmp/vqa   # baseline and STTS-50, 1 seed, short: a smoke test
    python -m benchmarks.video_qa --eval-split val --rows distractor-stts-50 --seeds 0   # tune on validation only
    python -m benchmarks.video_qa --render                 # rewrite video_qa.md and video_qa.png from its json

Modules: `data` (the videos, questions and tasks), `rows` (the rows of the tables and the batch a row sees), `train`
(the model, its training and the cached inits), `evaluate`, `pictures` (kept units drawn on test clips), `jobs` (one
run of a row, regime and seed; running them in workers), `summary` (means over seeds, the claims), `report`
(markdown and plot), `main` (the command line).
"""
