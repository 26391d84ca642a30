r"""Speed of TV-UNet on this machine against PyTorch at its best, as a skeptic would accept it.

  python -m experiments.benchmark [--quick] [--out experiments/results/benchmark.json]

One command writes one JSON record and a markdown report beside it (same name, `.md`). Every
measurement runs in a fresh child process that imports only the framework it measures (JAX, PyTorch
or ONNX Runtime): two frameworks in one process slow each other down by different amounts (two
OpenMP runtimes and two oneDNN builds spinning on the same cores). For each group (model, dtype,
batch, kind in {train, inference}) the run has `--rounds` rounds (full: 3, quick: 1) in alternating
order (JAX then PyTorch, then PyTorch then JAX, ...). In a round the JAX side is the library's
default path (`tvunet_jax.steps.make_train_fn`; `predict.SlicePredictor` for the network alone) and
the PyTorch side every peer variant (eager channels_last, `torch.compile`, and for inference a
frozen TorchScript graph with BatchNorm folded), each in its own process; the fastest variant that
ran is the round's peer. The report gives, per side, the median, min and max images/s and first-call
(compile + warm-up) seconds, and the ratio JAX / peer as the median of the per-round ratios with its
min and max; a ratio whose range holds 1.0 is "not a win" (or "not a loss"). Beside it: the machine
record (CPU model and ISA, the kernels oneDNN dispatched, the OpenMP runtimes each child loaded,
usable CPUs), the matmul peak of each framework and the model FLOP utilisation, the per-layer
convolution table (oneDNN direct vs Winograd vs PyTorch) and, where `tvunet_jax.export` and
onnxruntime are installed, ONNX Runtime's inference of the exported network.

Modules: `schedule` (plan, variants, rounds), `cli` (command line, children, the record),
`steps` (the measurements), `peers` (the PyTorch variants), `machine` (the machine record),
`layers` (the per-layer table, FLOPs), `report` (statistics, markdown). Nothing here imports a
framework at import time.

`--quick`: the demo model, batch 4, float32, 1 round, no per-layer table; about 1 minute with
`--no_torch` on 2 idle cores, several minutes with PyTorch (each `torch.compile` variant compiles
for tens of seconds). `--dry_run` lists the child processes of a plan. Timings mean nothing
across machines; a ratio measured in one run on one machine, with the CPU recorded, does.
"""
