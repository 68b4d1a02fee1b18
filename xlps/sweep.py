"""Config sweeps: experiment files, their points, and the table of their results.

An experiment file (``experiments/<name>.py``) is plain Python with

* ``BASE``: the config every point starts from, as ``launch.train`` takes it
  (``"configs/default.py:runlocal"``);
* ``get_grid() -> list[dict]``: one dict per point, usually built with :func:`product`,
  :func:`zipped` and :func:`seeds`. Without ``steps`` (below) a point's dict is its
  ``--config.KEY=VALUE`` overrides (dotted keys; ``seed`` is a key too);
* optionally ``COMMON``: overrides every point gets first (not part of the point names);
* optionally ``steps(point, workdir, root) -> Steps``: how a point runs when it is more
  than overrides of ``BASE``: its own ``--config`` (``configs/workdir.py:{workdir}`` for a
  model a pre-step wrote there), its overrides, the commands run before ``launch.train``
  (pre-steps, e.g. ``launch.recursify`` converting another point's checkpoint) and the
  points it waits for (they must come earlier in the grid). The point's dict then only
  names it: its keys are the result table's columns, not config keys;
* optionally ``report(root, rows)``: the experiment's own tables and plots from the rows of
  ``results.csv`` (one per finished point), written into ``root`` after the generic ones.

Each point trains in its own workdir, named from its dict, by the plain commands
:meth:`Job.commands` returns (``python -m`` each), so a sweep run by ``launch.sweep`` and
the same commands run by a cluster scheduler produce the same workdirs. ``run`` trains the
points, K at a time, on this machine or through a submitit executor (SLURM); ``collect``
reads the finished workdirs into rows; ``aggregate`` groups the rows of one group (the same
dict but ``seed``) into mean and std.
"""

from __future__ import annotations

import concurrent.futures
import csv
import ctypes
import dataclasses
import difflib
import importlib.util
import io
import itertools
import json
import math
import os
import pathlib
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections

from xlps import workdir_lock
from xlps.config import ConfigError, validate

Point = dict[str, Any]
DONE = "sweep_done.json"  # written into a point's workdir when its run reached num_steps
PRE_DONE = "sweep_pre_steps.json"  # written into a point's workdir when its pre-steps ran
PARENT_ENV = "XLPS_SWEEP_PARENT"  # the pid of the process running a point, in its commands' env
PR_SET_PDEATHSIG = 1  # linux/prctl.h
METRICS = ("eval_loss", "eval_accuracy", "eval_sequence_accuracy",
           "eval_test_long_accuracy", "eval_test_long_sequence_accuracy")


def product(*axes: Iterable[Point]) -> list[Point]:
  """Every combination of one dict from each axis, merged (later axes win)."""
  return [dict(itertools.chain.from_iterable(d.items() for d in combo))
          for combo in itertools.product(*map(list, axes))]


def zipped(*axes: Iterable[Point]) -> list[Point]:
  """The i-th dicts of all axes merged; the axes must have equal lengths."""
  axes = [list(a) for a in axes]
  if len({len(a) for a in axes}) > 1:
    raise ConfigError(f"zipped axes have different lengths {[len(a) for a in axes]}")
  return [dict(itertools.chain.from_iterable(d.items() for d in combo)) for combo in zip(*axes)]


def seeds(*values: int) -> list[Point]:
  return [{"seed": v} for v in values]


def load_module(path: str | os.PathLike, what: str):
  """The Python file ``path`` as a module; a missing file, a syntax error or an exception
  while it runs is a one-line ConfigError naming ``what`` and the file."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(f"{what} {os.fspath(path)!r} does not exist")
  spec = importlib.util.spec_from_file_location(f"_xlps_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise ConfigError(f"{what} {os.fspath(path)!r} has a syntax error at line {e.lineno}: "
                      f"{e.msg}") from None
  except Exception as e:  # noqa: BLE001 - whatever the file raised, in one line
    raise ConfigError(f"{what} {os.fspath(path)!r}: {_raised(path, e)}") from None
  return module


def _raised(path: pathlib.Path, error: BaseException) -> str:
  """``line N raised Type: message`` (N: the deepest line of ``path`` in the traceback)."""
  lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
           if os.path.realpath(f.filename) == os.path.realpath(path)]
  text = str(error).strip().splitlines()
  where = f"line {lines[-1]} " if lines else ""
  return f"{where}raised {type(error).__name__}: {text[0] if text else ''}"


def load_config(base: str) -> ml_collections.ConfigDict:
  """``path[:arg]`` -> ``get_config(arg)`` of that file (as ``launch.train`` loads it)."""
  path, _, arg = base.partition(":")
  return load_module(path, "config file").get_config(arg or None)


def apply(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
          where: str) -> ml_collections.ConfigDict:
  """``config`` with ``overrides`` set; unknown keys and wrong types raise ConfigError."""
  config = ml_collections.ConfigDict(config.to_dict())
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for i, name in enumerate([*parents, leaf]):
      if not isinstance(node, ml_collections.ConfigDict) or name not in node:
        known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {'.'.join([*parents[:i], close[0]])}?" if close else ""
        raise ConfigError(f"{where}: {key} is not a config key{hint}")
      if name != leaf or i < len(parents):
        node = node[name]
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict):
      raise ConfigError(f"{where}: {key} is a section; override its keys instead")
    if current is not None and not _same_type(current, value):
      raise ConfigError(f"{where}: {key}={value!r} is a {type(value).__name__}; the config "
                        f"holds a {type(current).__name__} ({current!r})")
    node[leaf] = value
  return config


def _same_type(current, value) -> bool:
  if isinstance(current, bool) or isinstance(value, bool):
    return isinstance(current, bool) and isinstance(value, bool)
  if isinstance(current, float):
    return isinstance(value, (int, float))
  return isinstance(value, type(current))


def call(experiment, hook: str, *args):
  """``experiment.hook(*args)``; whatever it raises is a one-line ConfigError naming the
  file and the line."""
  try:
    return getattr(experiment, hook)(*args)
  except Exception as e:  # noqa: BLE001 - whatever the hook raised, in one line
    raised = _raised(pathlib.Path(experiment.__file__), e)
    raise ConfigError(f"experiment file {experiment.__file__!r}: {hook}() at {raised}") from None


def points(experiment) -> list[Point]:
  """The experiment's grid, checked: non-empty, dicts of dotted keys, no duplicates."""
  where = f"experiment file {experiment.__file__!r}"
  if not callable(getattr(experiment, "get_grid", None)):
    raise ConfigError(f"{where} defines no get_grid(); valid: a file with BASE and get_grid() "
                      "returning a list of override dicts, e.g. experiments/sharing_orders.py")
  grid = call(experiment, "get_grid")
  if not isinstance(grid, list) or not grid:
    raise ConfigError(f"{experiment.__file__}: get_grid() returned {grid!r}; it must return "
                      "a non-empty list of override dicts")
  seen = {}
  for i, point in enumerate(grid):
    if not isinstance(point, dict):
      raise ConfigError(f"{experiment.__file__}: point {i} is {point!r}, not a dict")
    name = point_name(point)
    if name in seen:
      raise ConfigError(f"{experiment.__file__}: points {seen[name]} and {i} are the same "
                        f"({name}); every point needs its own overrides (add seeds?)")
    seen[name] = i
  return grid


def point_name(point: Point) -> str:
  """A workdir name from the overrides: ``order=cycle,seed=1`` (each key shortened to its
  shortest dotted suffix that no other key of the point ends with: ``num_unique=4,
  mlp.num_unique=1``; characters other than ``[A-Za-z0-9._=,+-]`` become ``_``)."""
  keys = [_short_key(k, point) for k in point]
  text = ",".join(f"{k}={_cli_value(v)}" for k, v in zip(keys, point.values())) or "base"
  return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def _short_key(key: str, point: Point) -> str:
  parts = key.split(".")
  for n in range(1, len(parts) + 1):
    suffix = ".".join(parts[-n:])
    if not any(k != key and (k == suffix or k.endswith("." + suffix)) for k in point):
      return suffix
  return key


def group_name(point: Point) -> str:
  """The name of the point's group: the points with the same overrides but ``seed``."""
  return point_name({k: v for k, v in point.items() if k != "seed"})


def _cli_value(value) -> str:
  return repr(value) if isinstance(value, float) else str(value)


def command(base: str, workdir: pathlib.Path, point: Point) -> list[str]:
  """The ``launch.train`` command line that trains ``point`` in ``workdir``."""
  return [sys.executable, "-m", "launch.train", f"--config={base}", f"--workdir={workdir}",
          *(f"--config.{k}={_cli_value(v)}" for k, v in point.items())]


def shell_line(cmd: Sequence[str]) -> str:
  return " ".join(shlex.quote(c) for c in ["python", *cmd[1:]])


@dataclasses.dataclass(frozen=True)
class Steps:
  """How one point runs (what an experiment's ``steps(point, workdir, root)`` returns):
  ``launch.train --config=config`` with ``overrides`` (after ``COMMON``'s), once the points
  ``after`` are done and the commands ``pre`` ran, each ``[module, *flags]`` run as
  ``python -m``, in order, in the repository root."""

  config: str
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  pre: Sequence[Sequence[str]] = ()
  after: Sequence[Point] = ()


@dataclasses.dataclass
class Job:
  """One point of a sweep, planned: its commands, its workdir and its config.

  ``config`` is validated by ``plan``, except where ``--config`` reads the point's own
  workdir (``configs/workdir.py:WORKDIR``), which its pre-steps write: then it is None until
  ``load_config`` reads it (``launch.train`` validates it first).
  """

  point: Point
  workdir: Any  # pathlib.Path, or an epath.Path (gs://) for dry runs and collecting
  config_arg: str
  overrides: dict[str, Any]
  pre_steps: list[list[str]] = dataclasses.field(default_factory=list)
  after: list[str] = dataclasses.field(default_factory=list)  # names of points run first
  config: ml_collections.ConfigDict | None = None

  @property
  def name(self) -> str:
    return self.workdir.name

  @property
  def log(self):
    """Where the output of the point's commands goes: ``ROOT/logs/NAME.log`` (not in its
    workdir, which a pre-step may need empty)."""
    return self.workdir.parent / "logs" / f"{self.name}.log"

  def commands(self) -> list[list[str]]:
    """Its pre-steps, then its ``launch.train`` command."""
    return [*self.pre_steps, command(self.config_arg, self.workdir, self.overrides)]

  def load_config(self) -> ml_collections.ConfigDict:
    if self.config is None:
      self.config = apply(load_config(self.config_arg), self.overrides, self.name)
    return self.config


def plan(experiment_path: str, root) -> tuple[Any, list[Job]]:
  """``(experiment module, jobs)``: one Job per point, in grid order, every config that
  does not read the point's own workdir validated before anything runs."""
  experiment = load_module(experiment_path, "experiment file")
  base = getattr(experiment, "BASE", None)
  if not isinstance(base, str) or not base:
    raise ConfigError(f"{experiment_path}: BASE must name a config, e.g. "
                      "'configs/default.py:runlocal'")
  common = getattr(experiment, "COMMON", {})
  grid = points(experiment)
  names = [point_name(point) for point in grid]
  loaded: dict[str, ml_collections.ConfigDict] = {}
  jobs = []
  for i, (point, name) in enumerate(zip(grid, names)):
    where = f"{experiment_path} point {i} ({name})"
    workdir = root / name
    steps = Steps(base, point)
    if hasattr(experiment, "steps"):
      steps = call(experiment, "steps", point, workdir, root)
      if not isinstance(steps, Steps):
        raise ConfigError(f"{where}: steps() returned {steps!r}, not a sweep.Steps")
    after = [point_name(p) for p in steps.after]
    for other in after:
      if other not in names[:i]:
        raise ConfigError(f"{where} waits for point {other}, which "
                          f"{'comes later in' if other in names else 'is not in'} the grid")
    job = Job(point, workdir, steps.config, {**common, **steps.overrides},
              [[sys.executable, "-m", *map(str, step)] for step in steps.pre], after)
    if not (job.pre_steps and os.fspath(workdir) in job.config_arg):
      if job.config_arg not in loaded:
        loaded[job.config_arg] = load_config(job.config_arg)
      job.config = apply(loaded[job.config_arg], job.overrides, where)
      try:
        validate(job.config)
      except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    jobs.append(job)
  return experiment, jobs


@dataclasses.dataclass(frozen=True)
class Slot:
  """One of the places the points of ``run`` take turns in: the CPU cores its process is
  pinned to (None: not pinned) and the environment variables that give it its accelerators."""

  cores: frozenset[int] | None
  env: Mapping[str, str]

  def describe(self) -> str:
    cores = f"cores {sorted(self.cores)}" if self.cores is not None else "cores not pinned"
    return " ".join([cores, *(f"{k}={v}" for k, v in self.env.items())])


GPU_MEMORY_FRACTION = 0.75  # what one JAX process preallocates of a GPU by default


def local_devices() -> tuple[str, int]:
  """This host's JAX platform (cpu, gpu, tpu) and device count, asked of a short child
  process: the sweep itself must not hold the accelerators its points need."""
  if os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip() == "cpu":
    return "cpu", 0
  code = "import jax; d = jax.local_devices(); print(d[0].platform, len(d))"
  try:
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=600)
    words, why = probe.stdout.split()[-2:], (probe.stderr.strip().splitlines() or ["?"])[-1]
  except subprocess.TimeoutExpired:
    words, why = [], "no answer in 600 s"
  if len(words) != 2 or not words[1].isdigit():
    print(f"sweep: could not list JAX's devices ({why}); the points run on CPU cores",
          flush=True)
    return "cpu", 0
  return words[0], int(words[1])


def slots(parallel: int, platform: str, count: int, environ: Mapping[str, str]) -> list[Slot]:
  """At most ``parallel`` slots on a host with ``count`` JAX devices of ``platform``.

  CPU cores are split into disjoint sets where the OS can pin a process to them
  (``os.sched_setaffinity``, Linux); elsewhere the points are not pinned. GPUs (those in the
  ``CUDA_VISIBLE_DEVICES`` the sweep was started with, else every one JAX sees): slot j of K
  gets the j-th contiguous block; with more slots than GPUs, slots share GPUs round-robin
  and split each one's memory (``XLA_PYTHON_CLIENT_MEM_FRACTION``, unless already set). TPU:
  a host's chips are held by one process, so there is one slot, with all of them.
  """
  pinnable = hasattr(os, "sched_setaffinity") and hasattr(os, "sched_getaffinity")
  cores = sorted(os.sched_getaffinity(0)) if pinnable else list(range(os.cpu_count() or 1))
  k = 1 if platform == "tpu" else max(1, min(parallel, len(cores)))
  envs: list[dict[str, str]] = [{} for _ in range(k)]
  if platform == "gpu":
    given = environ.get("CUDA_VISIBLE_DEVICES")
    visible = ([d.strip() for d in given.split(",") if d.strip()] if given
               else [str(i) for i in range(count)])
    n = len(visible)
    split_memory = not ({"XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_ALLOCATOR"} &
                        set(environ)) and environ.get("XLA_PYTHON_CLIENT_PREALLOCATE") != "false"
    for j, env in enumerate(envs):
      if k <= n:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(visible[j * n // k:(j + 1) * n // k])
      else:
        env["CUDA_VISIBLE_DEVICES"] = visible[j % n]
        sharing = len(range(j % n, k, n))
        if split_memory and sharing > 1:
          env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{GPU_MEMORY_FRACTION / sharing:.3g}"
  return [Slot(frozenset(cores[j::k]) if pinnable else None, env) for j, env in enumerate(envs)]


def reached_step(workdir) -> int:
  """The newest committed checkpoint step of a point's run (0 without one)."""
  checkpoints = workdir / "checkpoints"
  if not checkpoints.is_dir():
    return 0
  return max((int(p.name) for p in checkpoints.iterdir() if p.name.isdigit()), default=0)


def is_done(job: Job) -> bool:
  """Whether a point's checkpoints reached its num_steps, however it ran (this sweep, a
  SLURM job, its dry-run lines by hand): a run saves its last checkpoint after its last
  evaluation, so its metrics are complete. ``DONE`` only records the wall time."""
  step = reached_step(job.workdir)
  return step > 0 and step >= job.load_config().train.num_steps


def exit_with_parent() -> None:
  """In a point's training process (``PARENT_ENV`` set by ``execute``): SIGTERM to itself
  when the process running the point (the sweep, or its SLURM job) dies, however it dies
  (SIGKILL included), so no point trains on unwatched; the run saves a checkpoint at its
  step and stops, and the next sweep continues it. Linux: ``prctl(PR_SET_PDEATHSIG)``,
  which the kernel acts on at once; elsewhere a daemon thread that polls the parent pid
  every second."""
  parent = int(os.environ.get(PARENT_ENV) or 0)
  if not parent:
    return
  if sys.platform.startswith("linux"):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0:
      if os.getppid() != parent:  # the sweep died before prctl
        os.kill(os.getpid(), signal.SIGTERM)
      return

  def watch() -> None:
    while os.getppid() == parent:
      time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=watch, name="xlps-sweep-parent", daemon=True).start()


@dataclasses.dataclass(frozen=True)
class Outcome:
  """What running a point (``execute``) came to."""

  returncode: int  # of the first command that failed, else 0
  step: int  # its newest checkpoint step afterwards
  num_steps: int  # what it trains to (0 when a command failed)
  wall_time_s: float


def execute(job: Job, slot: Slot) -> Outcome:
  """Runs one point where it is called: in a thread of ``launch.sweep`` or in a SLURM job.

  The pre-steps run unless an earlier run finished them (``PRE_DONE``; the leftovers of
  unfinished ones are moved aside to ``NAME.incomplete-<UTC time>``, never deleted), then
  ``launch.train``, each command in a child process on ``slot`` (``PARENT_ENV`` makes it
  stop with this process), its output appended to ``job.log``. ``DONE`` (with the wall
  time) is written once the checkpoints reached num_steps.
  """
  start = time.time()
  job.log.parent.mkdir(parents=True, exist_ok=True)
  with open(job.log, "a") as log:
    code = 0
    if job.pre_steps and not (job.workdir / PRE_DONE).exists():
      if job.workdir.exists():
        utc = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = job.workdir.with_name(f"{job.name}.incomplete-{utc}")
        job.workdir.rename(aside)
        log.write(f"\nmoved {job.workdir} (its pre-steps did not finish) aside to {aside}\n")
      for cmd in job.pre_steps:
        code = code or _call(cmd, log, slot)
      if not code:
        job.workdir.mkdir(parents=True, exist_ok=True)
        (job.workdir / PRE_DONE).write_text(json.dumps(job.pre_steps))
    code = code or _call(job.commands()[-1], log, slot)
  step = reached_step(job.workdir)
  num_steps = job.load_config().train.num_steps if code == 0 else 0
  outcome = Outcome(code, step, num_steps, time.time() - start)
  if code == 0 and step >= num_steps:
    (job.workdir / (DONE + ".tmp")).write_text(json.dumps(
        {"wall_time_s": outcome.wall_time_s, "finished": time.time(), "step": step}))
    os.replace(job.workdir / (DONE + ".tmp"), job.workdir / DONE)
  return outcome


def _call(cmd: list[str], log, slot: Slot) -> int:
  """Runs ``cmd`` on ``slot``, its output appended to ``log``; its exit status."""
  log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {slot.describe()}\n"
            f"{shell_line(cmd)}\n")
  log.flush()
  proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                          env={**os.environ, **slot.env, PARENT_ENV: str(os.getpid())})
  if slot.cores is not None:
    # Pinned right after the start, before JAX creates its thread pools (a preexec_fn
    # would fork this process, whose JAX threads make forking unsafe).
    os.sched_setaffinity(proc.pid, slot.cores)
  return proc.wait()


def run(jobs: list[Job], parallel: int, executor=None) -> list[str]:
  """Runs the points not yet done (``is_done``), each once the points it waits for are
  done; returns one line for each point that failed, stopped before its num_steps, or
  could not start because a point it waits for did not finish.

  ``executor`` None: on this machine, ``parallel`` points at a time, each on its share of
  the cores and accelerators (``slots``), in threads of this process. Else a submitit
  executor (``submitit.AutoExecutor``): one job per point, at most ``parallel`` submitted
  at a time. The sweep's workdir (the parent of every point's) is locked for the sweep
  (``xlps.workdir_lock``), so a second sweep there stops at once.
  """
  root = jobs[0].workdir.parent
  root.mkdir(parents=True, exist_ok=True)
  with workdir_lock.hold(root, "launch.sweep"):
    if executor is not None:
      return _run(jobs, [Slot(None, {})] * max(1, parallel), executor)
    platform, count = ("cpu", 0) if all(map(is_done, jobs)) else local_devices()
    free = slots(parallel, platform, count, os.environ)
    if platform == "tpu" and parallel > 1:
      print(f"sweep: TPU: one process holds this host's chips, so --parallel={parallel} runs "
            "one point at a time", flush=True)
    if len(free) > 1 and free[0].cores is None:
      print("sweep: os.sched_setaffinity is not available on this platform; the parallel "
            "points run without pinning to CPU cores", flush=True)
    # Each point's commands start from a pool thread, which lives until the pool shuts
    # down: Linux's PR_SET_PDEATHSIG follows the thread that started the process.
    with concurrent.futures.ThreadPoolExecutor(len(free)) as pool:
      return _run(jobs, free, pool)


def _run(jobs: list[Job], free: list[Slot], executor) -> list[str]:
  todo = [j for j in jobs if not is_done(j)]
  done = {j.name for j in jobs} - {j.name for j in todo}
  running, failed, lost, durations, width = {}, [], set(), [], len(free)
  total, t0, last_line = len(todo), time.time(), 0.0
  print(f"sweep: {len(jobs)} points, {len(jobs) - total} already done, {total} to run, "
        f"{width} at a time", flush=True)

  def fail(job: Job, why: str) -> None:
    failed.append(f"{job.name}: {why}")
    lost.add(job.name)
    print(f"sweep: point {failed[-1]}", flush=True)

  while todo or running:
    for job in [j for j in todo if lost & set(j.after)]:
      todo.remove(job)
      fail(job, f"not run: it waits for {', '.join(sorted(lost & set(job.after)))}, which "
                "did not finish")
    for job in [j for j in todo if done >= set(j.after)][:len(free)]:
      todo.remove(job)
      slot = free.pop()
      running[executor.submit(execute, job, slot)] = (job, slot)
    for future in [f for f in running if f.done()]:
      job, slot = running.pop(future)
      free.append(slot)
      try:
        out = future.result()
      except Exception as e:  # noqa: BLE001 - a SLURM job that died, a bug: one line
        lines = str(e).strip().splitlines() or [""]
        fail(job, f"failed ({type(e).__name__}: {lines[-1]}); log: {job.log}")
        continue
      if out.returncode == 0 and out.step >= out.num_steps:
        done.add(job.name)
        durations.append(out.wall_time_s)
      elif out.returncode == 0:  # e.g. SIGTERM: it saved its step and exited cleanly
        fail(job, f"stopped at step {out.step} of {out.num_steps} (exit 0); not done: run "
                  f"the sweep again to continue it; log: {job.log}")
      else:
        fail(job, f"failed (exit {out.returncode}); log: {job.log}")
    now = time.time()
    if now - last_line > 30 or not (todo or running):
      finished = total - len(todo) - len(running)
      eta = ""
      if durations:
        left = len(todo) + len(running) / 2
        eta = " | ETA " + time.strftime(
            "%H:%M:%S", time.gmtime(sum(durations) / len(durations) * left / width))
      print(f"sweep: {finished} done ({len(failed)} failed), {len(running)} running, "
            f"{len(todo)} left | {now - t0:.0f} s{eta}", flush=True)
      last_line = now
    time.sleep(0.2)
  return failed


def collect(config: ml_collections.ConfigDict, point: Point, workdir) -> dict:
  """One results row of a finished point: its dict, size, cost, eval metrics, speed, and the
  wall time ``DONE`` recorded (NaN for a point run outside the sweep)."""
  from xlps import metrics, models  # JAX: only when results are collected
  summary = models.summarize(models.spec_of(config), config.data.seq_len)
  rows = metrics.read_records(workdir)
  evals = [r for r in rows if "eval_loss" in r]
  speed = [r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r]
  row = {"point": point_name(point),
         "group": group_name(point), **point,
         "unique_params": summary["unique_params"], "applied_params": summary["applied_params"],
         "flops_per_token": summary["flops_per_token"],
         "steps": rows[-1]["step"] if rows else 0}
  # Adaptive depth adds eval_loss_iter{r} (looped models at each evaluated depth), puzzle
  # models eval_sequence_accuracy_step{s} (after s supervision steps), and the mean ponder /
  # depth / supervision steps used and the halting head's agreement (final values only:
  # lower is not better for them).
  adaptive = sorted({k for r in evals for k in r
                     if k.startswith(("eval_loss_iter", "eval_sequence_accuracy_step"))
                     or k.endswith(("_ponder", "_depth", "_supervision_steps",
                                    "_halt_accuracy"))})
  for key in (*METRICS, *adaptive):
    values = [r[key] for r in evals if key in r]
    if values:
      row[f"final_{key}"] = values[-1]
      if "loss" in key or "accuracy" in key:
        row[f"best_{key}"] = (min if "loss" in key else max)(values)
  marked = workdir / DONE
  row["wall_time_s"] = (json.loads(marked.read_text())["wall_time_s"] if marked.exists()
                        else math.nan)
  row["tokens_per_sec"] = statistics.median(speed) if speed else math.nan
  return row


def is_result(column: str) -> bool:
  """Columns measured by a run (averaged over seeds), as opposed to what defines a point."""
  return column.startswith(("final_", "best_")) or column in _MEASURED


def aggregate(rows: Sequence[dict]) -> list[dict]:
  """Rows of one ``group`` (the same overrides but ``seed``) merged: each result column as
  its mean and ``<column>_std`` (sample std; 0 for one seed), plus ``seeds``."""
  groups: dict[str, list[dict]] = {}
  for row in rows:
    groups.setdefault(row["group"], []).append(row)
  out = []
  for name, members in groups.items():
    merged = {"group": name, "seeds": len(members)}
    for column, value in members[0].items():
      if column in ("point", "group", "seed"):
        continue
      if not is_result(column):
        merged[column] = value
        continue
      values = [m[column] for m in members if column in m]
      merged[column] = statistics.fmean(values)
      merged[f"{column}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    out.append(merged)
  return out


_MEASURED = ("steps", "wall_time_s", "tokens_per_sec")


def markdown(groups: Sequence[dict]) -> str:
  """One table row per group: size, cost, eval metrics as mean +- std over its seeds."""
  metrics = [c for c in dict.fromkeys(k for g in groups for k in g)
             if c.startswith(("final_", "best_")) and not c.endswith("_std")]
  head = ["point", "seeds", "unique params", "applied params", "FLOPs/token",
          *(m.replace("_", " ") for m in metrics), "tokens/s", "wall s"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for g in groups:
    cells = [g["group"], str(g["seeds"]), f"{g['unique_params']:,}", f"{g['applied_params']:,}",
             f"{g['flops_per_token']:.3g}"]
    cells += [f"{g[m]:.4f} +- {g[m + '_std']:.4f}" if m in g else "" for m in metrics]
    cells += [f"{g['tokens_per_sec']:.0f}", f"{g['wall_time_s']:.0f}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_results(root, jobs: list[Job], experiment) -> int:
  """results.csv, results.md, plots and the experiment's ``report`` from the points that
  are done (``root`` local or gs://); returns how many."""
  finished = [job for job in jobs if is_done(job)]
  rows = [collect(job.load_config(), job.point, job.workdir) for job in finished]
  if not rows:
    return 0
  write_csv(root / "results.csv", rows)
  groups = aggregate(rows)
  (root / "results.md").write_text(markdown(groups))
  plot(root, [(job.point, job.workdir) for job in finished], groups)
  if hasattr(experiment, "report"):
    call(experiment, "report", root, rows)
  print(f"sweep: {len(rows)} points in {root / 'results.csv'}, {root / 'results.md'}")
  return len(rows)


def write_csv(path, rows: Sequence[dict]) -> None:
  """``rows`` as CSV at ``path`` (local or gs://), a column for every key of any row."""
  text = io.StringIO()
  writer = csv.DictWriter(text, list(dict.fromkeys(k for row in rows for k in row)))
  writer.writeheader()
  writer.writerows(rows)
  path.write_text(text.getvalue())


def save_figure(fig, path) -> None:
  """``fig`` as a PNG at ``path`` (local or gs://, through epath), then closed."""
  import matplotlib.pyplot as plt
  fig.tight_layout()
  with path.open("wb") as f:
    fig.savefig(f, format="png", dpi=100)
  plt.close(fig)


def plot(root, finished: Sequence[tuple[Point, Any]], groups: Sequence[dict]) -> None:
  """loss_vs_step.png (every point), final eval loss vs unique params and vs FLOPs/token."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from xlps import metrics
  fig, ax = plt.subplots(figsize=(7, 4.5))
  cmap = plt.cm.tab10 if len(groups) <= 10 else plt.cm.tab20
  colours = {g["group"]: cmap(i % cmap.N) for i, g in enumerate(groups)}
  labelled = set()  # one colour and one legend entry per group: its seeds share them
  for point, workdir in finished:
    rows = [r for r in metrics.read_records(workdir) if "train_loss" in r]
    group = group_name(point)
    ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], lw=1,
            color=colours.get(group), label=None if group in labelled else group)
    labelled.add(group)
  ax.set(xlabel="step", ylabel="train loss (nats/token)")
  if len(groups) <= 20:
    ax.legend(fontsize=6)
  save_figure(fig, root / "loss_vs_step.png")
  for x, label, name in (("unique_params", "unique parameters", "loss_vs_unique_params.png"),
                         ("flops_per_token", "applied training FLOPs per token",
                          "loss_vs_flops.png")):
    metric = "final_eval_loss"
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for g in groups:
      if metric in g:
        ax.errorbar(g[x], g[metric], yerr=g[metric + "_std"], fmt="o", capsize=3)
        ax.annotate(g["group"], (g[x], g[metric]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    ax.set(xscale="log", xlabel=label, ylabel="final eval loss (mean +- std over seeds)")
    save_figure(fig, root / name)
