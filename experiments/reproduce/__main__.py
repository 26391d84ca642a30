r"""The study's command: plan, run (resuming), and write the report after every run.

  python -m experiments.reproduce --out experiments/results            # the study, 5 seeds
  python -m experiments.reproduce --out experiments/results --backend_check   # + XLA U-Net runs
  python -m experiments.reproduce --quick --out /tmp/smoke              # CI smoke run

Runs live in `<out>/runs/<variant>/seed<k>` (`--quick`: under `<out>/quick/`, reports named
`reproduce_quick.*`, so a smoke run never mixes with the study). An interrupted study resumes at
its first unfinished run; `--budget_minutes` starts no new run after that long, so a session of
fixed length ends cleanly with complete runs.
"""

from __future__ import annotations

from tvunet_jax import host_memory

if __name__ == "__main__":  # run as a program: before JAX's threads exist
  host_memory.keep_freed_memory()

import argparse  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402

from experiments.configs import study  # noqa: E402
from experiments.reproduce import plan as plan_lib  # noqa: E402
from experiments.reproduce import report  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def commit() -> str:
  """`git rev-parse HEAD` of the repository, '+dirty' when tracked files differ from it."""
  try:
    head = subprocess.run(
      ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "--untracked-files=no"],
      cwd=REPO,
      capture_output=True,
      text=True,
      check=True,
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown (no git)"
  return head + ("+dirty" if dirty else "")


def machine() -> str:
  """CPU model from /proc/cpuinfo and the core count."""
  model = "unknown CPU"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          model = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{model}, {os.cpu_count()} cores"


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny data and model: smoke test")
  parser.add_argument("--out", default=os.path.join("experiments", "results"))
  parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (5; --quick 2)")
  parser.add_argument(
    "--backend_check",
    action="store_true",
    help="also train the U-Net seeds on XLA convolutions (separate table)",
  )
  parser.add_argument(
    "--backend_check_seeds",
    type=int,
    default=0,
    help="with --backend_check: only the first N seeds (0: all); an XLA run is the slowest",
  )
  parser.add_argument(
    "--sum_seeds",
    type=int,
    default=0,
    help="the matched sum-TV arms on the first N seeds only (0: all); at 128 x 128 they are the "
    "mean-TV arms' loss exactly (plan.make_plan)",
  )
  parser.add_argument(
    "--budget_minutes",
    type=float,
    default=0.0,
    help="> 0: start no new run after this many minutes",
  )
  args = parser.parse_args(argv)
  if args.backend_check and os.environ.get("TVUNET_CONV_BACKEND"):
    parser.error(
      "--backend_check compares backends: unset $TVUNET_CONV_BACKEND, which overrides both sides"
    )
  seeds = list(range(args.seeds or (2 if args.quick else 5)))
  if len(seeds) < 1:
    parser.error("--seeds must be >= 1")
  out = os.path.abspath(args.out)
  root = os.path.join(out, "quick") if args.quick else out
  prefix = "reproduce_quick" if args.quick else "reproduce"
  base = study.get_config("quick" if args.quick else "")
  base.data.manual_dir = os.path.join(root, "data", "medseg_phantom")  # one data set for all
  base.data.data_dir = os.path.join(root, "data", "tfds")
  arms = plan_lib.variants(args.quick)
  check_seeds = (
    (seeds[: args.backend_check_seeds] if args.backend_check_seeds else seeds)
    if (args.backend_check)
    else []
  )
  sum_seeds = seeds[: args.sum_seeds] if args.sum_seeds else None
  runs = plan_lib.make_plan(arms, seeds, backend_check_seeds=check_seeds, sum_seeds=sum_seeds)
  all_arms = list(arms) + ([plan_lib.BACKEND_CHECK] if args.backend_check else [])
  start = time.time()

  from experiments.reproduce import runs as runs_lib  # noqa: PLC0415  (imports JAX)
  from tvunet_jax.kernels import conv  # noqa: PLC0415

  def write(records):
    backends = sorted({str(r.get("conv_backend")) for r in records})
    meta = {
      "command": "python -m experiments.reproduce " + " ".join(argv),
      "commit": commit(),
      "conv_backend": (
        f"default 'auto' -> {conv.choose('auto').describe()}; runs: {', '.join(backends)}"
      ),
      "machine": machine(),
      "wall_seconds": time.time() - start,
      "run_seconds": sum(float(r.get("seconds") or 0.0) for r in records),
      "planned_runs": len(runs),
      "finished_runs": len(records),
      "seeds": seeds,
      "plan": [{"variant": r.variant.name, "seed": r.seed} for r in runs],
    }
    return report.write(out, prefix, records, all_arms, meta, {"config": base.to_dict()})

  records = plan_lib.run_study(
    runs,
    base,
    root,
    runs_lib.evaluate_run,
    budget_seconds=args.budget_minutes * 60.0,
    on_record=write,
  )
  print(write(records))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
