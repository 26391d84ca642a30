r"""Entry point: parse --config/--workdir, join the cluster if there is one, train.

  python -m tvunet_jax.main --config experiments/configs/default.py --workdir runs/demo
  python -m tvunet_jax.main --config experiments/configs/default.py --workdir runs/b \
      --config.loss.tv_weight=0

Multi-process (one process per host, or several on one machine for testing):
  python -m tvunet_jax.main ... --coordinator_address=10.0.0.1:1234 --num_processes=4 \
      --process_id=$RANK
On Cloud TPU pods, SLURM and Open MPI launches, `jax.distributed.initialize()` reads the
cluster from the environment (`--distributed=auto` does this when it finds one).
"""

from tvunet_jax import host_memory

if __name__ == "__main__":  # run as a program: before JAX's threads exist
  host_memory.keep_freed_memory()

import json
import os

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from tvunet_jax import console, train

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "ml_collections config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs and data.")
_DISTRIBUTED = flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "on", "off"],
  "auto: initialise jax.distributed when flags or the environment describe several processes.",
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Index of this process.")
flags.mark_flags_as_required(["config", "workdir"])


def _cluster_from_env() -> bool:
  """True where a launcher announced a multi-process job (JAX, Cloud TPU pod, SLURM, Open MPI)."""
  env = os.environ
  return (
    bool(env.get("JAX_COORDINATOR_ADDRESS"))
    or "," in env.get("TPU_WORKER_HOSTNAMES", "")
    or int(env.get("SLURM_NTASKS", "1")) > 1
    or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
  )


def main(argv):
  del argv
  console.quiet_libraries()  # libraries' INFO only at --verbosity=1
  explicit = _COORDINATOR.value is not None or (_NUM_PROCESSES.value or 1) > 1
  if _DISTRIBUTED.value == "on" or (
    _DISTRIBUTED.value == "auto" and (explicit or _cluster_from_env())
  ):
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  logging.info(
    "process %d of %d; %d local / %d global devices (%s)",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
    jax.default_backend(),
  )
  final = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  logging.vlog(1, "final: %s", json.dumps(final, sort_keys=True))
  if jax.process_index() == 0 and "test/dice" in final:
    console.print_table(*final_table(final, _CONFIG.value.eval.threshold, _WORKDIR.value))


def final_table(final: dict, threshold: float, workdir: str) -> tuple[str, list, str]:
  """(title, rows, footer) of the run's test metrics for `console.print_table`."""
  f = lambda k: f"{final[k]:.4f}" if k in final else "-"
  rows = [
    ("Dice", f"{f('test/dice')}  (a constant prediction: {f('test/dice_constant_baseline')})"),
    ("IoU", f("test/iou")),
    ("precision / recall", f"{f('test/precision')} / {f('test/recall')}"),
    ("average precision", f("test/average_precision")),
    ("mean volume Dice", f("test/mean_volume_dice")),
    ("paper_miou", f"{f('test/paper_miou')}  (the paper's smoothed score, >= 0.98 for any map)"),
  ]
  if "test/lesionwise_dice" in final:
    rows.append(("lesion-wise Dice", f("test/lesionwise_dice")))
  footer = f"report: {os.path.join(workdir, 'test_metrics.json')}"
  return f"test split at threshold {threshold:.2f}", rows, footer


if __name__ == "__main__":
  app.run(main)
