"""Runs an experiment's grid of configs, K points at a time; resumable.

    python -m launch.sweep --experiment=experiments/sharing_orders.py --workdir=/tmp/orders
    python -m launch.sweep --experiment=experiments/sharing_orders.py --workdir=/tmp/orders \
        --dry_run      # each point's commands (pre-steps, then launch.train), in order
    python -m launch.sweep --experiment=experiments/sharing_orders.py --workdir=/tmp/orders \
        --launcher=slurm --slurm=slurm_partition=gpu --slurm=gpus_per_node=1 --parallel=16
    python -m launch.sweep --experiment=experiments/sharing_orders.py \
        --workdir=gs://BUCKET/orders --collect_only    # tables and plots, nothing runs

Every point runs in ``WORKDIR/<point name>`` with the commands ``--dry_run`` prints, their
output in ``WORKDIR/logs/<point name>.log``; a point whose checkpoints reached its
num_steps is done and skipped by later runs of the same sweep, an interrupted one (also one
stopped by SIGTERM, which exits 0) resumes from its checkpoints. The sweep locks WORKDIR (a
second sweep there stops with the first one's pid). ``--launcher=local`` (default) runs the
points on this machine, on disjoint sets of the cores and, on a GPU host, of the GPUs
(``xlps.sweep.slots``), and stops them (saving a checkpoint) when the sweep process dies;
``--launcher=slurm`` submits one submitit job per point (``submitit_local``: the same jobs
as processes on this machine, to try it without a cluster). At the end (also when some
points failed) ``WORKDIR/results.csv`` (one row per point), ``results.md`` (mean and std
over seeds), plots and the experiment's own ``report`` are written.
"""

import ast
import pathlib
import sys

from absl import app, flags
from etils import epath

from xlps import config as config_lib
from xlps import storage, sweep

_EXPERIMENT = flags.DEFINE_string("experiment", None, "Experiment file (experiments/NAME.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "One sub-directory per point goes here.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Points run (or SLURM jobs queued) at a time.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print each point's commands and exit.")
_COLLECT_ONLY = flags.DEFINE_bool("collect_only", False,
                                  "Write the tables and plots of the finished points (local "
                                  "or gs:// workdirs) and exit; nothing runs.")
_LAUNCHER = flags.DEFINE_enum("launcher", "local", ["local", "slurm", "submitit_local"],
                              "Where points run: this machine, one SLURM job each (submitit), "
                              "or submitit's local processes.")
_SLURM = flags.DEFINE_multi_string("slurm", [], "KEY=VALUE for submitit's update_parameters "
                                   "(timeout_min=60, gpus_per_node=1, slurm_partition=gpu, "
                                   "...); repeatable.")


def executor(root: pathlib.Path):
  """None for ``--launcher=local``, else a submitit executor with the ``--slurm`` settings
  (jobs' pickles and outputs in ``WORKDIR/submitit``)."""
  if _LAUNCHER.value == "local":
    return None
  try:
    import submitit
  except ImportError:
    raise config_lib.ConfigError(f"--launcher={_LAUNCHER.value} needs submitit: pip install "
                                 "'xlps[slurm]'") from None
  cluster = "local" if _LAUNCHER.value == "submitit_local" else "slurm"
  params = {"timeout_min": 24 * 60} if cluster == "local" else {}  # local default: 2 min
  for item in _SLURM.value:
    key, sep, value = item.partition("=")
    if not sep:
      raise config_lib.ConfigError(f"--slurm={item!r} is not KEY=VALUE")
    try:
      params[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      params[key] = value  # a plain string: a partition, a time
  result = submitit.AutoExecutor(folder=root / "submitit", cluster=cluster)
  try:
    result.update_parameters(**params)
  except (NameError, AssertionError, ValueError) as e:  # submitit's ways of refusing
    raise config_lib.ConfigError(f"--slurm: {str(e).splitlines()[0]}") from None
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  remote = "://" in _WORKDIR.value
  root = epath.Path(_WORKDIR.value) if remote else pathlib.Path(_WORKDIR.value).absolute()
  try:
    if _DRY_RUN.value and _COLLECT_ONLY.value:
      raise config_lib.ConfigError("--dry_run and --collect_only: choose one")
    if remote and not _DRY_RUN.value:
      if not _COLLECT_ONLY.value:
        raise config_lib.ConfigError(
            f"--workdir={_WORKDIR.value}: a sweep runs its points in a folder this machine "
            "(and its SLURM jobs) can reach; use --dry_run to print the commands for a "
            "cluster with a remote workdir, and --collect_only to collect them")
      storage.check_filesystem(_WORKDIR.value)
    experiment, jobs = sweep.plan(_EXPERIMENT.value, root)
    if _DRY_RUN.value:
      for job in jobs:
        for cmd in job.commands():
          print(sweep.shell_line(cmd))
      return
    if _COLLECT_ONLY.value:
      if not sweep.write_results(root, jobs, experiment):
        print(f"sweep: no point of {len(jobs)} is done in {root}", file=sys.stderr)
        sys.exit(1)
      return
    failed = sweep.run(jobs, _PARALLEL.value, executor(root))
  except config_lib.ConfigError as e:  # a bad experiment, flag, or a workdir in use
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  sweep.write_results(root, jobs, experiment)
  if failed:
    print(f"sweep: {len(failed)} points did not finish:\n  " + "\n  ".join(failed),
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["experiment", "workdir"])
  app.run(main)
