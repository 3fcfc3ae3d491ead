"""Speed of STTS against the unpruned model, measured in one process.

For every model family, frame count and prune ratio: the inference forward (prefill), `generate` of 16 tokens, and a
training step (forward + backward + zero_grad) with only the scorer trainable and with the whole model trainable.
Baseline and STTS run alternately (round-robin over the ratios at a frame count), medians over `--repeats` runs,
speed-up as a ratio. Next to every measured speed-up stands the ideal one, from an analytic count of matrix-multiply
FLOPs (cross-checked against `torch.utils.flop_counter.FlopCounterMode`); also the peak memory of a training step
(fresh child processes) and the scorer's own cost. Writes `speed.json`, `speed.md` and `speed.png` into `--out`.

    python -m benchmarks.speed                           # 2 families, 8-32 frames x 3 ratios + 64 frames at 50%
                                                         # (~20 min on 2 quiet cores)
    python -m benchmarks.speed --all-ratios-at 8 16 32 64  # the full grid (~25 min)
    python -m benchmarks.speed --quick --out /tmp/speed  # smoke test: 8 frames of 112 px, one ratio, one repeat
    python -m benchmarks.speed --profile --frames 32 --ratios 0.5 --threads 1   # where STTS spends its time
    python -m benchmarks.speed --render                  # rewrite speed.md and speed.png from --out/speed.json

Modules: `kinds` (what is measured), `families` (the benchmark's models), `flops` (the analytic FLOP model),
`measure` (timing and the steps it times), `memory` (peak memory in fresh processes), `benchmark` (one family's
result rows), `profiling` (`--profile`), `report` (tables, markdown, plot), `main` (the command line).
"""
