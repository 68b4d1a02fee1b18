"""Runs an experiment's grid of configs locally, K points at a time; resumable.

    python -m launch.sweep --experiment=experiments/sharing_orders.py --workdir=/tmp/orders
    python -m launch.sweep --experiment=experiments/sharing_orders.py --workdir=/tmp/orders \
        --dry_run      # one launch.train command per point, for a cluster scheduler

Every point trains in ``WORKDIR/<point name>`` with the command ``--dry_run`` prints; a point
whose run reached its num_steps is marked done and skipped by later runs of the same sweep,
an interrupted one (also one stopped by SIGTERM, which exits 0) resumes from its
checkpoints. The sweep locks WORKDIR (a second sweep there stops with the first one's pid),
and its points' runs stop (saving a checkpoint) when the sweep process dies. The K parallel
points get disjoint sets of the cores and, on a GPU host, of the GPUs
(``xlps.sweep.slots``). At the end (also when some points failed) ``WORKDIR/results.csv``
(one row per point), ``results.md`` (mean and std over seeds) and plots are written.
"""

import csv
import pathlib
import sys

from absl import app, flags
from etils import epath

from xlps import config as config_lib
from xlps import sweep

_EXPERIMENT = flags.DEFINE_string("experiment", None, "Experiment file (experiments/NAME.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "One sub-directory per point goes here.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Points trained at the same time.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print each point's command and exit.")


def write_results(root: pathlib.Path, jobs: list[tuple]) -> None:
  """results.csv, results.md and plots from the points that are done."""
  finished = [(point, config, workdir) for point, _, config, workdir in jobs
              if sweep.is_done(workdir, config)]
  rows = [sweep.collect(config, point, workdir) for point, config, workdir in finished]
  if not rows:
    return
  columns = list(dict.fromkeys(k for row in rows for k in row))
  with (root / "results.csv").open("w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)
  groups = sweep.aggregate(rows)
  (root / "results.md").write_text(sweep.markdown(groups))
  sweep.plot(root, [(point, workdir) for point, _, workdir in finished], groups)
  print(f"sweep: {len(rows)} points in {root / 'results.csv'}, {root / 'results.md'}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  remote = "://" in _WORKDIR.value
  root = epath.Path(_WORKDIR.value) if remote else pathlib.Path(_WORKDIR.value).absolute()
  try:
    if remote and not _DRY_RUN.value:
      raise config_lib.ConfigError(f"--workdir={_WORKDIR.value}: a sweep runs its points on "
                                   "this machine, in a local folder; use --dry_run to print "
                                   "the commands for a cluster with a remote workdir")
    base, jobs = sweep.plan(_EXPERIMENT.value, root)
  except config_lib.ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if _DRY_RUN.value:
    for _, overrides, _, workdir in jobs:
      print(sweep.shell_line(sweep.command(base, workdir, overrides)))
    return
  try:
    failed = sweep.run(base, jobs, _PARALLEL.value)
  except config_lib.ConfigError as e:  # another sweep holds the workdir
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  write_results(root, jobs)
  if failed:
    print(f"sweep: {len(failed)} points failed; logs:\n  " + "\n  ".join(failed),
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["experiment", "workdir"])
  app.run(main)
