"""minilib's benchmark harness: how fast the lesson kernels run on this machine, and how far from its limits.

- `bench_matmul.py`: lesson 01's matmul ladder (loops -> elementwise -> broadcast -> einsum -> torch) and
  square matmuls (torch; Triton on CUDA).
- `bench_cross_entropy.py`: lesson 03's cross-entropy versions against `F.cross_entropy` and the fused kernel,
  forward and forward+backward, at the lesson's size and at vocabulary sizes.
- `bench_batch_norm.py`: lesson 10's BatchNorm ladder (the lesson's, `F.batch_norm`, `fused_batch_norm`) in
  training, forward and forward+backward, at lesson 07's layer shapes, against read+write floors.
- `bench_conv.py`: lesson 06's convolutions as `F.unfold` + matmul against `F.conv2d`, in GFLOP/s.
- `bench_train_step.py`: one SGD step of lesson 07's CNN with `nn.BatchNorm2d` and with `FusedBatchNorm2d`,
  and its norm layers alone.
- `bench_linear_cross_entropy.py`, `bench_ddp.py`: the fused linear cross-entropy; one process against two.
- `harness.py`: the case sets (tiny / quick / full), the machine limits measured at the start of a run,
  the check-before-timing and the roofline bookkeeping every benchmark shares.
- `run.py`: `python -m benchmarks.run [--quick] [pytest args]` (what `nox -s bench` calls): runs pytest with
  pytest-benchmark, writes bench-results/bench.json, then `report.py` turns that JSON into
  bench-results/bench-report.md and PNG charts.

Under `pytest --benchmark-disable` (as `nox -s tests` runs) every benchmark runs once on tiny sizes, so the
harness cannot rot.
"""
