"""The project's benchmarks; their results, in `benchmarks/results/`, make README's Results section.

- `benchmarks.speed`: speed of STTS against the unpruned model (forward, generate, training steps), with the ideal
  speed-up from an analytic FLOP model, the peak memory and the scorer's cost.
- `benchmarks.video_qa`: accuracy of STTS on synthetic video-QA tasks, against random, similarity pruning and frame
  subsampling, with the base model frozen and trained.
- `benchmarks.serving_estimate`: prefill FLOPs at a real model's shapes, pruning in the ViT against after it
  (docs/serving.md).
- `benchmarks/readme_results.py`: writes README's Results section from `benchmarks/results/`.
- `benchmarks.common`: what they share (commands, machine, markdown tables, plots, report files).

Run from the repository's root (`pip install -e ".[bench]"` first):

    python -m benchmarks.speed --help
    python -m benchmarks.video_qa --help
    python -m benchmarks.serving_estimate
    python benchmarks/readme_results.py            # then rewrite README's Results section (--check: only compare)
"""
