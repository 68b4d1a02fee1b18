"""Runs an experiment's grid of configs locally, K points at a time; resumable.

    python -m launch.sweep --experiment=experiments/sharing_orders.py --workdir=/tmp/orders
    python -m launch.sweep --experiment=experiments/sharing_orders.py --workdir=/tmp/orders \
        --dry_run      # one launch.train command per point, for a cluster scheduler

Every point trains in ``WORKDIR/<point name>`` with the command ``--dry_run`` prints; a point
whose run exited 0 is marked done and skipped by later runs of the same sweep, an
interrupted one resumes from its checkpoints. The K parallel points get disjoint sets of
the cores. At the end (also when some points failed) ``WORKDIR/results.csv`` (one row per
point), ``results.md`` (mean and std over seeds) and plots are written.
"""

import csv
import json
import os
import pathlib
import subprocess
import sys
import time

from absl import app, flags
from etils import epath

from xlps import config as config_lib
from xlps import sweep

_EXPERIMENT = flags.DEFINE_string("experiment", None, "Experiment file (experiments/NAME.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "One sub-directory per point goes here.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Points trained at the same time.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print each point's command and exit.")


def core_sets(parallel: int) -> list[set[int]]:
  cores = sorted(os.sched_getaffinity(0))
  k = max(1, min(parallel, len(cores)))
  return [set(cores[i::k]) for i in range(k)]


def run(base: str, jobs: list[tuple], parallel: int) -> list[str]:
  """Trains the points not yet done; returns the log paths of those that failed."""
  todo = [j for j in jobs if not (j[3] / sweep.DONE).exists()]
  free, running, failed, durations = core_sets(parallel), {}, [], []
  total, t0 = len(todo), time.time()
  print(f"sweep: {len(jobs)} points, {len(jobs) - total} already done, {total} to run, "
        f"{len(free)} at a time", flush=True)
  last_line = 0.0
  while todo or running:
    while todo and free:
      _, overrides, _, workdir = todo.pop(0)
      cores = free.pop()
      workdir.mkdir(parents=True, exist_ok=True)
      log = (workdir / "sweep.log").open("a")
      log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} cores {sorted(cores)}\n")
      log.flush()
      proc = subprocess.Popen(sweep.command(base, workdir, overrides), stdout=log,
                              stderr=subprocess.STDOUT)
      # Pinned right after the start, before JAX creates its thread pools (a preexec_fn
      # would fork this process, whose JAX threads make forking unsafe).
      os.sched_setaffinity(proc.pid, cores)
      running[proc] = (workdir, cores, log, time.time())
    for proc in [p for p in running if p.poll() is not None]:
      workdir, cores, log, start = running.pop(proc)
      log.close()
      free.append(cores)
      if proc.returncode == 0:
        durations.append(time.time() - start)
        done = workdir / sweep.DONE
        (workdir / (sweep.DONE + ".tmp")).write_text(json.dumps(
            {"wall_time_s": durations[-1], "finished": time.time()}))
        os.replace(workdir / (sweep.DONE + ".tmp"), done)
      else:
        failed.append(os.fspath(workdir / "sweep.log"))
        print(f"sweep: point {workdir.name} failed (exit {proc.returncode}); log: "
              f"{failed[-1]}", flush=True)
    now = time.time()
    if now - last_line > 30 or not (todo or running):
      done = total - len(todo) - len(running)
      eta = ""
      if durations:
        left = len(todo) + len(running) / 2
        eta = " | ETA " + time.strftime(
            "%H:%M:%S", time.gmtime(sum(durations) / len(durations) * left / parallel))
      print(f"sweep: {done} done ({len(failed)} failed), {len(running)} running, "
            f"{len(todo)} left | {now - t0:.0f} s{eta}", flush=True)
      last_line = now
    time.sleep(0.2)
  return failed


def write_results(root: pathlib.Path, jobs: list[tuple]) -> None:
  """results.csv, results.md and plots from the points that are done."""
  finished = [(point, config, workdir) for point, _, config, workdir in jobs
              if (workdir / sweep.DONE).exists()]
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
  failed = run(base, jobs, _PARALLEL.value)
  write_results(root, jobs)
  if failed:
    print(f"sweep: {len(failed)} points failed; logs:\n  " + "\n  ".join(failed),
          file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  flags.mark_flags_as_required(["experiment", "workdir"])
  app.run(main)
