"""Sweeps: bad experiment files are refused up front; the dry-run commands are the sweep;
a sweep killed mid-way and re-run completes every point exactly once."""

import csv
import json
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from etils import epath

from helpers import ROOT, records, run_command
from test_workdir import fake_gcs  # noqa: F401 - the fixture: gs:// in memory
from xlps import config as config_lib
from xlps import sweep

EXPERIMENT = '''
from xlps import sweep

BASE = "configs/default.py:runlocal"
COMMON = {{"train.num_steps": 6, "train.decay_steps": 6, "data.seq_len": 32,
          "model.max_len": 32, "train.batch_size": 8, "data.eval_batches": 2,
          "train.eval_every_steps": 3, "train.log_every_steps": 1,
          "train.checkpoint_every_steps": 2, "data.data_dir": "{data_dir}"}}


def get_grid():
  return {grid}
'''
GRID = 'sweep.product([{"model.sharing.num_unique": m} for m in (1, 2)], sweep.seeds(0))'


def write_experiment(path: pathlib.Path, data_dir, grid: str = GRID) -> pathlib.Path:
  path.write_text(EXPERIMENT.format(data_dir=data_dir, grid=grid))
  return path


def sweep_command(experiment, workdir, *flags):
  return [sys.executable, "-m", "launch.sweep", f"--experiment={experiment}",
          f"--workdir={workdir}", *flags]


RESULT_COLUMNS = ("point", "unique_params", "applied_params", "flops_per_token", "steps",
                  "final_eval_loss", "best_eval_loss", "final_eval_accuracy")


def results(workdir) -> list[dict]:
  with open(pathlib.Path(workdir) / "results.csv") as f:
    return [{k: row[k] for k in RESULT_COLUMNS} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir):
  root = tmp_path_factory.mktemp("sweep")
  experiment = write_experiment(root / "tiny.py", data_dir)
  done = run_command(sweep_command(experiment, root / "run", "--parallel=2"))
  assert done.returncode == 0, done.stderr[-3000:]
  return experiment, root / "run"


BAD = [
    ('[{"model.sharing.num_uniq": 2}]', r"model.sharing.num_uniq is not a config key; "
                                        r"did you mean model.sharing.num_unique\?"),
    ("[]", r"get_grid\(\) returned \[\]; it must return a non-empty list"),
    ('[{"seed": 1}, {"seed": 1}]', r"points 0 and 1 are the same \(seed=1\)"),
    ('[{"train.num_steps": "many"}]', r"train.num_steps='many' is a str; the config holds "
                                      r"a int"),
    ('[{"model.num_heads": 3}]', r"point 0 \(num_heads=3\): model.num_heads=3 does not divide"),
    ('[{"model": 3}]', r"model is a section"),
    ('[3]', r"point 0 is 3, not a dict"),
    ('[{"seed": 1}', r"experiment file '.*bad\.py' has a syntax error at line 12: '\[' was "
                     r"never closed$"),
    ('[{"seed": 1 / 0}]', r"experiment file '.*bad\.py': get_grid\(\) at line 12 raised "
                          r"ZeroDivisionError: division by zero$"),
]


@pytest.mark.parametrize("grid,message", BAD, ids=[b[1][:24] for b in BAD])
def test_bad_experiment_files_are_refused_before_anything_runs(tmp_path, data_dir, grid,
                                                               message):
  experiment = write_experiment(tmp_path / "bad.py", data_dir, grid)
  with pytest.raises(config_lib.ConfigError, match=message):
    sweep.plan(os.fspath(experiment), tmp_path / "run")
  assert not (tmp_path / "run").exists()


def test_bad_experiment_is_one_line_and_exit_2(tmp_path, data_dir):
  experiment = write_experiment(tmp_path / "bad.py", data_dir, "[]")
  out = run_command(sweep_command(experiment, tmp_path / "run"))
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert "error: " in out.stderr and "non-empty list" in out.stderr
  missing = run_command(sweep_command(tmp_path / "nope.py", tmp_path / "run"))
  assert missing.returncode == 2 and "experiment file" in missing.stderr


def test_experiment_file_without_get_grid_is_one_line(tmp_path):
  experiment = tmp_path / "nogrid.py"
  experiment.write_text('BASE = "configs/default.py:runlocal"\n')
  with pytest.raises(config_lib.ConfigError, match=r"experiment file '.*nogrid\.py' defines no "
                     r"get_grid\(\); valid: a file with BASE and get_grid\(\) returning a list of "
                     r"override dicts, e\.g\. experiments/sharing_orders\.py"):
    sweep.plan(os.fspath(experiment), tmp_path / "run")
  experiment.write_text("import no_such_module_xlps\n")
  with pytest.raises(config_lib.ConfigError, match=r"experiment file '.*nogrid\.py': line 1 "
                     r"raised ModuleNotFoundError: No module named 'no_such_module_xlps'$"):
    sweep.plan(os.fspath(experiment), tmp_path / "run")


def test_grid_helpers():
  assert sweep.product([{"a": 1}, {"a": 2}], [{"b": 3}]) == [{"a": 1, "b": 3}, {"a": 2, "b": 3}]
  assert sweep.zipped([{"a": 1}, {"a": 2}], [{"b": 3}, {"b": 4}]) == [{"a": 1, "b": 3},
                                                                       {"a": 2, "b": 4}]
  with pytest.raises(config_lib.ConfigError, match="different lengths"):
    sweep.zipped([{"a": 1}], [])
  assert sweep.point_name({"model.sharing.order": "cycle", "seed": 2}) == "order=cycle,seed=2"
  assert sweep.point_name({"model.sharing.table": "0 1"}) == "table=0_1"
  assert sweep.point_name({"model.sharing.num_unique": 4, "model.sharing.mlp.num_unique": 1,
                           "model.embed_dim": 0}) == "sharing.num_unique=4,mlp.num_unique=1,embed_dim=0"


@pytest.mark.slow
def test_dry_run_commands_are_the_sweep(uninterrupted, tmp_path):
  """Running the printed commands by hand gives the sweep's workdirs and numbers."""
  experiment, swept = uninterrupted
  printed = run_command(sweep_command(experiment, tmp_path / "by_hand", "--dry_run"))
  assert printed.returncode == 0, printed.stderr[-3000:]
  lines = [line for line in printed.stdout.splitlines() if line.startswith("python -m")]
  assert len(lines) == 2
  for line in lines:
    args = shlex.split(line)
    done = run_command([sys.executable, *args[1:]])
    assert done.returncode == 0, done.stderr[-3000:]
  by_hand = sorted(p.name for p in (tmp_path / "by_hand").iterdir())
  assert by_hand == sorted(p.name for p in swept.iterdir() if p.is_dir() and p.name != "logs")
  for name in by_hand:
    assert ([{k: r.get(k) for k in ("step", "train_loss", "eval_loss")}
             for r in records(tmp_path / "by_hand" / name)] ==
            [{k: r.get(k) for k in ("step", "train_loss", "eval_loss")}
             for r in records(swept / name)])


@pytest.mark.slow
def test_killed_sweep_resumes_and_completes_every_point_once(uninterrupted, tmp_path):
  experiment, swept = uninterrupted
  proc = subprocess.Popen(sweep_command(experiment, tmp_path / "run", "--parallel=1"), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  deadline = time.time() + 300
  while time.time() < deadline:  # kill once one point is done and the next has a checkpoint
    marks = list((tmp_path / "run").glob(f"*/{sweep.DONE}"))
    ckpts = [p for p in (tmp_path / "run").glob("*/checkpoints/*") if p.name.isdigit()
             and not (p.parent.parent / sweep.DONE).exists()]
    if marks and ckpts:
      break
    assert proc.poll() is None, "the sweep finished before it could be killed"
    time.sleep(0.05)
  os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its training child
  proc.wait()
  again = run_command(sweep_command(experiment, tmp_path / "run", "--parallel=1"))
  assert again.returncode == 0, again.stderr[-3000:]
  assert "1 already done, 1 to run" in again.stdout
  resumed = ckpts[0].parent.parent.name
  assert "Resumed from" in (tmp_path / "run" / "logs" / f"{resumed}.log").read_text()
  for point in (tmp_path / "run").iterdir():
    if point.is_dir() and point.name not in ("logs", "submitit"):
      assert (point / sweep.DONE).exists()
      assert [r["step"] for r in records(point)] == list(range(1, 7))
  assert results(tmp_path / "run") == results(swept)


def test_collect_keeps_adaptive_depth_metrics(tmp_path):
  """A looped model's eval_loss_iter{r} and an ACT model's ponder reach results.csv."""
  from tests.helpers import tiny
  config = config_lib.base_config()
  config.model = tiny("decoder_lm", 4)
  rows = [{"step": 5, "tokens_per_sec": 10.0},
          {"step": 10, "eval_loss": 2.0, "eval_loss_iter1": 2.5, "eval_loss_iter4": 1.9,
           "eval_ponder": 3.25}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (tmp_path / sweep.DONE).write_text(json.dumps({"wall_time_s": 1.0}))
  row = sweep.collect(config, {"seed": 0}, tmp_path)
  assert row["final_eval_loss_iter1"] == 2.5 and row["best_eval_loss_iter4"] == 1.9
  assert row["final_eval_ponder"] == 3.25 and "best_eval_ponder" not in row
  assert sweep.is_result("final_eval_loss_iter4")


class FakePopen:
  """A point's command that exits 0 after a moment, leaving its last checkpoint at step
  ``reach`` (``num_steps`` of the fake points) in its ``--workdir``; records its command and
  environment and how many commands ran at the same time (in the sweep's threads)."""

  started: list = []
  live = peak = 0
  reach = NUM_STEPS = 3
  fail: tuple = ()  # a command holding one of these strings exits 1
  lock = threading.Lock()

  def __init__(self, cmd, env=None, **kwargs):
    self.cmd, self.env, self.returncode = cmd, env, None
    self.start = time.monotonic()
    self.workdir = workdir = pathlib.Path(next(a[10:] for a in cmd if a.startswith("--workdir=")))
    (workdir / "checkpoints" / str(FakePopen.reach)).mkdir(parents=True, exist_ok=True)
    with FakePopen.lock:
      self.pid = 10_000 + len(FakePopen.started)
      FakePopen.started.append(self)
      FakePopen.live += 1
      FakePopen.peak = max(FakePopen.peak, FakePopen.live)

  def wait(self):
    time.sleep(0.3)  # long enough for the points started together to overlap
    self.end = time.monotonic()
    with FakePopen.lock:
      FakePopen.live -= 1
    self.returncode = int(any(f in " ".join(self.cmd) for f in FakePopen.fail))
    return self.returncode


def fake_sweep(tmp_path, monkeypatch, platform: str, count: int, parallel: int,
               points: int = 4) -> list:
  """Runs ``sweep.run`` on ``points`` points with JAX seeing ``count`` ``platform`` devices;
  returns the started fake processes."""
  assert sweep.run(fake_jobs(tmp_path, monkeypatch, platform, count, points), parallel) == []
  assert all((tmp_path / f"seed={i}" / sweep.DONE).exists() for i in range(points))
  return FakePopen.started


def fake_popen(monkeypatch, platform: str = "cpu", count: int = 0) -> None:
  """Commands run by FakePopen; JAX sees ``count`` ``platform`` devices."""
  FakePopen.started, FakePopen.live, FakePopen.peak = [], 0, 0
  monkeypatch.setattr(sweep.subprocess, "Popen", FakePopen)
  monkeypatch.setattr(sweep, "local_devices", lambda: (platform, count), raising=False)


def fake_jobs(tmp_path, monkeypatch, platform: str = "cpu", count: int = 0,
              points: int = 4) -> list[sweep.Job]:
  """``points`` points of NUM_STEPS steps, trained by FakePopen on ``count`` ``platform``
  devices."""
  fake_popen(monkeypatch, platform, count)
  config = config_lib.base_config()
  config.train.num_steps = FakePopen.NUM_STEPS
  return [sweep.Job({"seed": i}, tmp_path / f"seed={i}", "configs/default.py:runlocal",
                    {"seed": i}, config=config) for i in range(points)]


def test_a_point_stopped_before_its_num_steps_is_not_done(tmp_path, monkeypatch, capsys):
  """A point stopped by SIGTERM saves its step and exits 0: it is reported, not marked done,
  and the next run of the sweep continues it."""
  monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: None, raising=False)
  jobs = fake_jobs(tmp_path, monkeypatch, points=1)
  monkeypatch.setattr(FakePopen, "reach", 1)
  failed = sweep.run(jobs, 1)
  assert failed == [f"seed=0: stopped at step 1 of 3 (exit 0); not done: run the sweep again "
                    f"to continue it; log: {tmp_path / 'logs' / 'seed=0.log'}"]
  assert not (tmp_path / "seed=0" / sweep.DONE).exists()
  assert "point seed=0: stopped at step 1 of 3 (exit 0)" in capsys.readouterr().out
  monkeypatch.setattr(FakePopen, "reach", 3)
  assert sweep.run(jobs, 1) == []
  assert len(FakePopen.started) == 2 and (tmp_path / "seed=0" / sweep.DONE).exists()
  assert sweep.run(jobs, 1) == []
  assert len(FakePopen.started) == 2  # done: not run again


def test_two_sweeps_in_one_workdir_refuse_the_second(tmp_path, monkeypatch):
  from test_workdir import hold_lock
  monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: None, raising=False)
  fd = hold_lock(tmp_path)
  try:
    with pytest.raises(config_lib.ConfigError, match=r"is in use by launch.train \(pid 4242 "
                                                     r"on host elsewhere"):
      sweep.run(fake_jobs(tmp_path, monkeypatch), 2)
  finally:
    os.close(fd)
  assert FakePopen.started == []


@pytest.mark.parametrize("platform, count, visible, parallel, expected, peak, fraction", [
    ("gpu", 4, None, 2, {"0,1", "2,3"}, 2, None),     # point j of K: its block of the GPUs
    ("gpu", 2, "3,5", 2, {"3", "5"}, 2, None),        # the user's CUDA_VISIBLE_DEVICES split
    ("gpu", 1, None, 3, {"0"}, 3, "0.25"),            # one GPU shared: its memory split
    ("tpu", 4, None, 2, {None}, 1, None),             # a host's TPU chips: one point at a time
    ("cpu", 0, None, 2, {None}, 2, None),
])
def test_parallel_points_get_their_share_of_the_accelerators(
    tmp_path, monkeypatch, platform, count, visible, parallel, expected, peak, fraction):
  if visible is None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  else:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
  monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
  pinned = []
  monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: pinned.append(cores),
                      raising=False)
  started = fake_sweep(tmp_path, monkeypatch, platform, count, parallel)
  envs = [p.env or {} for p in started]
  assert {e.get("CUDA_VISIBLE_DEVICES") for e in envs} == expected, envs
  if platform == "gpu" and count > 1:  # the points running together never share a GPU
    assert envs[0]["CUDA_VISIBLE_DEVICES"] != envs[1]["CUDA_VISIBLE_DEVICES"]
  assert {e.get("XLA_PYTHON_CLIENT_MEM_FRACTION") for e in envs} == {fraction}
  assert FakePopen.peak == peak
  assert all(e.get("PATH") == os.environ["PATH"] for e in envs if e)  # the rest is inherited
  assert len(pinned) == 4 and (peak == 1 or not pinned[0] & pinned[1])  # disjoint cores


def test_sweep_runs_where_cpu_affinity_is_unavailable(tmp_path, monkeypatch, capsys):
  """macOS has neither os.sched_getaffinity nor os.sched_setaffinity: the points run
  unpinned, said in one line."""
  monkeypatch.delattr(os, "sched_setaffinity", raising=False)
  monkeypatch.delattr(os, "sched_getaffinity", raising=False)
  started = fake_sweep(tmp_path, monkeypatch, "cpu", 0, parallel=2)
  assert len(started) == 4 and FakePopen.peak == 2
  notes = [line for line in capsys.readouterr().out.splitlines() if "affinity" in line]
  assert len(notes) == 1, notes


def test_local_devices_asks_a_child_process(monkeypatch):
  """The sweep learns the platform without initializing a backend itself (it would hold the
  GPUs' memory or the TPU chips its points need); JAX_PLATFORMS=cpu needs no probe."""
  assert sweep.local_devices() == ("cpu", 0)  # conftest: JAX_PLATFORMS=cpu
  monkeypatch.setenv("JAX_PLATFORMS", "")
  platform, count = sweep.local_devices()
  assert (platform, count) == ("cpu", 8) or platform in ("gpu", "tpu") and count >= 1


def alive(pid: int) -> bool:
  """Whether ``pid`` runs (a zombie, which no parent has reaped yet, does not)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc (Linux)")
@pytest.mark.slow
def test_a_killed_sweep_takes_its_training_children_along(tmp_path, data_dir):
  """SIGKILL of the sweep process (no handler can run): its training child gets SIGTERM,
  saves a checkpoint and exits, instead of training on unwatched."""
  experiment = write_experiment(tmp_path / "long.py", data_dir,
                                '[{"train.num_steps": 100000, "train.decay_steps": 100000}]')
  proc = subprocess.Popen(sweep_command(experiment, tmp_path / "run"), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
  try:
    deadline, child = time.time() + 300, None
    while time.time() < deadline and child is None:  # the child trains: it saved a step
      assert proc.poll() is None, "the sweep ended early"
      pids = [int(p) for task in pathlib.Path(f"/proc/{proc.pid}/task").glob("*/children")
              for p in task.read_text().split()]  # a point starts from one of its threads
      if pids and list((tmp_path / "run").glob("*/checkpoints/[0-9]*")):
        child = pids[0]
      time.sleep(0.1)
    assert child is not None, "no training child started"
    proc.kill()
    proc.wait()
    deadline = time.time() + 60
    while alive(child) and time.time() < deadline:
      time.sleep(0.2)
    assert not alive(child), "the training child of the killed sweep trains on"
    log = next((tmp_path / "run" / "logs").glob("*.log")).read_text()
    assert "SIGTERM: stopping at step" in log, log[-2000:]
  finally:
    os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the sweep's session


# Pre-steps: a point that converts another point's checkpoint before it trains.
PRE_EXPERIMENT = '''
from xlps import sweep

BASE = "configs/default.py:runlocal"
COMMON = {"train.num_steps": 3, "train.warmup_steps": 1}
SOURCE = {"kind": "source"}


def get_grid():
  return [SOURCE, {"kind": "converted"}, {"kind": "scratch"}]


def steps(point, workdir, root):
  if point["kind"] != "converted":
    return sweep.Steps(BASE, {"seed": len(point["kind"])})
  convert = ["launch.recursify", f"--from={root / sweep.point_name(SOURCE)}",
             f"--workdir={workdir}"]
  return sweep.Steps(BASE, {}, pre=[convert], after=[SOURCE])
'''


def pre_step_jobs(tmp_path, monkeypatch) -> list[sweep.Job]:
  """PRE_EXPERIMENT's three points, run by FakePopen on 16 cores."""
  (tmp_path / "pre.py").write_text(PRE_EXPERIMENT)
  _, jobs = sweep.plan(os.fspath(tmp_path / "pre.py"), tmp_path / "run")
  fake_popen(monkeypatch)
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
  return jobs


def ran(since: int = 0) -> list[str]:
  """``module workdir-name`` of each command FakePopen started (from the ``since``-th)."""
  return [f"{p.cmd[2]} {p.workdir.name}" for p in FakePopen.started[since:]]


def test_pre_steps_run_once_after_the_points_they_wait_for(tmp_path, monkeypatch):
  jobs = pre_step_jobs(tmp_path, monkeypatch)
  pinned = {}
  monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: pinned.update({pid: cores}),
                      raising=False)
  assert sweep.run(jobs, 3) == []
  cmd = dict(zip(ran(), FakePopen.started))
  source, scratch = cmd["launch.train kind=source"], cmd["launch.train kind=scratch"]
  convert, train = cmd["launch.recursify kind=converted"], cmd["launch.train kind=converted"]
  assert len(cmd) == 4 and scratch.start < source.end  # 3 slots: they ran side by side,
  assert source.end <= convert.start and convert.end <= train.start  # the converted waited
  converted = [pinned[p.pid] for p in FakePopen.started if p.workdir.name == "kind=converted"]
  assert len(converted) == 2 and converted[0] == converted[1]  # one slot for both commands
  log = (tmp_path / "run" / "logs" / "kind=converted.log").read_text()
  assert log.index("python -m launch.recursify") < log.index("python -m launch.train")
  assert sweep.run(jobs, 3) == [] and len(FakePopen.started) == 4  # all done: nothing runs

  point = tmp_path / "run" / "kind=converted"  # its training was interrupted: train only
  shutil.rmtree(point / "checkpoints")
  assert sweep.run(jobs, 3) == [] and ran(4) == ["launch.train kind=converted"]
  (point / sweep.PRE_DONE).unlink()  # its pre-step was interrupted: moved aside, both again
  shutil.rmtree(point / "checkpoints")
  assert sweep.run(jobs, 3) == []
  assert ran(5) == ["launch.recursify kind=converted", "launch.train kind=converted"]
  aside = list((tmp_path / "run").glob("kind=converted.incomplete-*"))
  assert len(aside) == 1 and (aside[0] / sweep.DONE).exists()


@pytest.mark.parametrize("fail, expected", [
    ("kind=source", ["kind=source: failed (exit 1); log: {logs}/kind=source.log",
                     "kind=converted: not run: it waits for kind=source, which did not finish"]),
    ("launch.recursify", ["kind=converted: failed (exit 1); log: {logs}/kind=converted.log"]),
])
def test_a_point_is_not_trained_when_what_it_needs_failed(tmp_path, monkeypatch, fail,
                                                           expected):
  jobs = pre_step_jobs(tmp_path, monkeypatch)
  monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: None, raising=False)
  monkeypatch.setattr(FakePopen, "fail", (fail,))
  logs = tmp_path / "run" / "logs"
  assert sweep.run(jobs, 3) == [e.format(logs=logs) for e in expected]
  assert "launch.train kind=converted" not in ran()
  assert not (tmp_path / "run" / "kind=converted" / sweep.PRE_DONE).exists()
  assert (tmp_path / "run" / "kind=scratch" / sweep.DONE).exists()  # the others go on


BAD_STEPS = [
    ('return {"seed": 1}', r"point 0 \(kind=a\): steps\(\) returned \{'seed': 1\}, not a "
                           r"sweep.Steps"),
    ('return sweep.Steps(BASE, after=[{"kind": "b"}])',
     r"point 0 \(kind=a\) waits for point kind=b, which comes later in the grid"),
    ('return sweep.Steps(BASE, after=[{"kind": "c"}])',
     r"point 0 \(kind=a\) waits for point kind=c, which is not in the grid"),
    ('return sweep.Steps(BASE, {"seed": point["seed"]})',
     r"experiment file '.*steps\.py': steps\(\) at line 7 raised KeyError: 'seed'$"),
]


@pytest.mark.parametrize("body,message", BAD_STEPS, ids=[b[1][:24] for b in BAD_STEPS])
def test_bad_steps_are_refused_before_anything_runs(tmp_path, body, message):
  experiment = tmp_path / "steps.py"
  experiment.write_text(f'from xlps import sweep\nBASE = "configs/default.py:runlocal"\n'
                        f'def get_grid():\n  return [{{"kind": "a"}}, {{"kind": "b"}}]\n\n'
                        f'def steps(point, workdir, root):\n  {body}\n')
  with pytest.raises(config_lib.ConfigError, match=message):
    sweep.plan(os.fspath(experiment), tmp_path / "run")
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", sorted((ROOT / "experiments").glob("*.py")),
                         ids=lambda p: p.stem)
def test_every_experiment_file_plans_its_commands(path, tmp_path, monkeypatch):
  """What ``launch.sweep --dry_run`` prints for each experiment file: every point
  validated (or, reading its own workdir, deferred to its pre-steps), commands in order."""
  monkeypatch.chdir(ROOT)
  _, jobs = sweep.plan(os.fspath(path.relative_to(ROOT)), tmp_path / "run")
  assert jobs and not (tmp_path / "run").exists()
  names = [job.name for job in jobs]
  for i, job in enumerate(jobs):
    *pre, train = job.commands()
    assert train[1:3] == ["-m", "launch.train"] and f"--workdir={job.workdir}" in train
    assert (job.config is None) == (bool(pre) and os.fspath(job.workdir) in job.config_arg)
    assert set(job.after) <= set(names[:i])


def test_recursify_study_dry_run_prints_its_pre_steps(tmp_path):
  """The study's commands are the old runner's, each recursify line before its training."""
  root = tmp_path / "study"
  out = run_command([sys.executable, "-m", "launch.sweep",
                     "--experiment=experiments/recursify_study.py", f"--workdir={root}",
                     "--dry_run"])
  assert out.returncode == 0, out.stderr[-3000:]
  lines = [shlex.split(line) for line in out.stdout.splitlines()]
  assert [line[2] for line in lines].count("launch.train") == 64
  assert [line[2] for line in lines].count("launch.recursify") == 38
  trained = []
  for i, line in enumerate(lines):
    flags = dict(a.split("=", 1) for a in line[3:])
    if line[2] == "launch.recursify":
      assert flags["--from"] in trained  # its source trains earlier
      train = dict(a.split("=", 1) for a in lines[i + 1][3:])
      assert train["--workdir"] == flags["--workdir"]
      assert train["--config"] == f"configs/workdir.py:{flags['--workdir']}"
    else:
      trained.append(flags["--workdir"])
  source = lines[0][3:]
  assert sorted(source) == sorted([
      "--config=configs/default.py:unshared,runlocal", f"--workdir={root}/kind=source,M=6,"
      "rank=0,seed=0", "--config.seed=0", "--config.train.batch_size=16",
      "--config.data.seq_len=64", "--config.model.max_len=64", "--config.train.warmup_steps=30",
      "--config.train.log_every_steps=50", "--config.data.eval_batches=16",
      "--config.train.num_steps=600", "--config.train.decay_steps=600",
      "--config.train.learning_rate=0.003", "--config.train.eval_every_steps=600",
      "--config.train.checkpoint_every_steps=600"])


# Collecting: the tables and plots of finished workdirs, local or on gs://, nothing run.
COLLECT_EXPERIMENT = '''
from xlps import sweep

BASE = "{root}/configs/default.py:runlocal"
COMMON = {{"train.num_steps": 4, "train.warmup_steps": 1}}


def get_grid():
  return sweep.product([{{"model.sharing.num_unique": m}} for m in (1, 2)], sweep.seeds(0))


def report(root, rows):
  (root / "report.txt").write_text(" ".join(row["point"] for row in rows))
'''


def finished_run(write, steps: int) -> None:
  """The files a run that reached ``steps`` leaves: metrics rows and its last checkpoint
  (``write(relative path, text)``), without the sweep's DONE mark."""
  rows = [{"step": s, "train_loss": 5.0 - s, "tokens_per_sec": 100.0 * s}
          for s in range(1, steps + 1)] + [{"step": steps, "eval_loss": 4.5 - steps}]
  write("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
  write(f"checkpoints/{steps}/_CHECKPOINT_METADATA", "{}")


def test_collect_only_reads_finished_workdirs_local_and_on_gcs(tmp_path, fake_gcs):
  """Points run elsewhere (no DONE mark, e.g. a cluster's dry-run lines): the one whose
  checkpoints reached num_steps is collected, the other not; gs:// gives the same tables."""
  experiment = tmp_path / "collect.py"
  experiment.write_text(COLLECT_EXPERIMENT.format(root=ROOT))
  local = tmp_path / "sweep"
  for name, steps in (("num_unique=1,seed=0", 4), ("num_unique=2,seed=0", 2)):
    def write(path, text, name=name):
      (local / name / path).parent.mkdir(parents=True, exist_ok=True)
      (local / name / path).write_text(text)
      fake_gcs.pipe(f"gs://bucket/sweep/{name}/{path}", text.encode())
    finished_run(write, steps)
  out = run_command(sweep_command(experiment, local, "--collect_only"))
  assert out.returncode == 0, out.stderr[-3000:]
  with open(local / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert [(r["point"], r["steps"], r["final_eval_loss"], r["wall_time_s"]) for r in rows] == [
      ("num_unique=1,seed=0", "4", "0.5", "nan")]
  assert (local / "report.txt").read_text() == "num_unique=1,seed=0"
  assert sorted(p.name for p in local.iterdir()) == [
      "loss_vs_flops.png", "loss_vs_step.png", "loss_vs_unique_params.png",
      "num_unique=1,seed=0", "num_unique=2,seed=0", "report.txt", "results.csv",
      "results.md"]  # no logs, no lock: nothing ran

  experiment_module, jobs = sweep.plan(os.fspath(experiment), epath.Path("gs://bucket/sweep"))
  assert sweep.write_results(epath.Path("gs://bucket/sweep"), jobs, experiment_module) == 1
  for name in ("results.csv", "results.md", "report.txt"):
    assert fake_gcs.cat(f"gs://bucket/sweep/{name}") == (local / name).read_bytes(), name
  assert fake_gcs.cat("gs://bucket/sweep/loss_vs_step.png")[:4] == b"\x89PNG"


def test_collect_only_without_finished_points_and_bad_flags_are_one_line(tmp_path, data_dir):
  experiment = write_experiment(tmp_path / "tiny.py", data_dir)
  for flags, message in ((["--collect_only"], "sweep: no point of 2 is done in"),
                         (["--collect_only", "--dry_run"], "error: --dry_run and --collect_only"),
                         (["--launcher=submitit_local", "--slurm=gpus_per_nod=1"],
                          "error: --slurm: "),
                         (["--launcher=submitit_local", "--slurm=gpus"],
                          "error: --slurm='gpus' is not KEY=VALUE")):
    out = run_command(sweep_command(experiment, tmp_path / "run", *flags))
    assert out.returncode in (1, 2) and "Traceback" not in out.stderr, (flags, out.stderr)
    assert message in out.stderr, (flags, out.stderr[-2000:])
  assert not (tmp_path / "run" / "logs").exists()  # nothing ran


@pytest.mark.slow
def test_submitit_jobs_run_pre_steps_and_are_collected_like_local_points(tmp_path, data_dir):
  """Through submitit (its local executor: a process per job, as SLURM would run them): a
  source point trains, a recursified point converts it (pre-step, once the source is
  done) and trains from its own workdir's config; results as the local launcher's."""
  experiment = tmp_path / "recursify.py"
  experiment.write_text(f'''
from xlps import sweep

BASE = "configs/default.py:runlocal"
COMMON = {{"train.num_steps": 2, "train.decay_steps": 2, "train.warmup_steps": 1,
          "data.seq_len": 32, "model.max_len": 32, "train.batch_size": 8,
          "data.eval_batches": 1, "train.eval_every_steps": 2, "train.log_every_steps": 1,
          "train.checkpoint_every_steps": 2, "model.num_layers": 2,
          "data.data_dir": "{data_dir}"}}
SOURCE = {{"kind": "source"}}


def get_grid():
  return [SOURCE, {{"kind": "recursified"}}]


def steps(point, workdir, root):
  if point == SOURCE:
    return sweep.Steps("configs/default.py:unshared,runlocal", {{"model.sharing.num_unique": 2}})
  recursify = ["launch.recursify", f"--from={{root / sweep.point_name(SOURCE)}}",
               f"--workdir={{workdir}}", "--num_unique=1", "--lora_rank=2"]
  return sweep.Steps(f"configs/workdir.py:{{workdir}}", {{}}, pre=[recursify], after=[SOURCE])
''')
  root = tmp_path / "run"
  done = run_command(sweep_command(experiment, root, "--launcher=submitit_local",
                                   "--parallel=2"))
  assert done.returncode == 0, done.stderr[-3000:]
  assert len(list((root / "submitit").glob("*_submitted.pkl"))) == 2  # one job per point
  log = (root / "logs" / "kind=recursified.log").read_text()
  assert "python -m launch.recursify" in log and "Resumed from" in log  # its step 0
  with open(root / "results.csv") as f:
    rows = {r["point"]: r for r in csv.DictReader(f)}
  assert sorted(rows) == ["kind=recursified", "kind=source"]
  assert [r["step"] for r in records(root / "kind=recursified")] == [1, 2]
  assert int(rows["kind=recursified"]["unique_params"]) < int(rows["kind=source"]["unique_params"])
  table = (root / "results.csv").read_bytes()
  again = run_command(sweep_command(experiment, root, "--collect_only"))
  assert again.returncode == 0 and (root / "results.csv").read_bytes() == table
  local = run_command(sweep_command(experiment, root))  # the local launcher: all done
  assert local.returncode == 0 and "2 already done, 0 to run" in local.stdout
