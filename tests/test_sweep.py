"""Sweeps: bad experiment files are refused up front; the dry-run commands are the sweep;
a sweep killed mid-way and re-run completes every point exactly once."""

import csv
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, records, run_command
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
  assert by_hand == sorted(p.name for p in swept.iterdir() if p.is_dir())
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
  assert "Resumed from" in (ckpts[0].parent.parent / "sweep.log").read_text()
  for point in (tmp_path / "run").iterdir():
    if point.is_dir():
      assert (point / sweep.DONE).exists()
      assert [r["step"] for r in records(point)] == list(range(1, 7))
  assert results(tmp_path / "run") == results(swept)


def test_collect_keeps_adaptive_depth_metrics(tmp_path):
  """A looped model's eval_loss_iter{r} and an ACT model's ponder reach results.csv."""
  import json
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
  """A point's training process that exits 0 at once, its last checkpoint at step ``reach``
  (``num_steps`` of the fake points); records its environment and how many points ran at
  the same time."""

  started: list = []
  live = peak = 0
  reach = NUM_STEPS = 3

  def __init__(self, cmd, env=None, **kwargs):
    self.pid, self.returncode, self.env = 10_000 + len(self.started), None, env
    workdir = pathlib.Path(next(a for a in cmd if a.startswith("--workdir="))[10:])
    (workdir / "checkpoints" / str(FakePopen.reach)).mkdir(parents=True)
    FakePopen.started.append(self)
    FakePopen.live += 1
    FakePopen.peak = max(FakePopen.peak, FakePopen.live)

  def poll(self):
    if self.returncode is None:
      self.returncode = 0
      FakePopen.live -= 1
    return self.returncode


def fake_sweep(tmp_path, monkeypatch, platform: str, count: int, parallel: int,
               points: int = 4) -> list:
  """Runs ``sweep.run`` on ``points`` points with JAX seeing ``count`` ``platform`` devices;
  returns the started fake processes."""
  assert sweep.run("configs/default.py:runlocal", fake_jobs(tmp_path, monkeypatch, platform,
                                                          count, points), parallel) == []
  assert all((tmp_path / f"seed={i}" / sweep.DONE).exists() for i in range(points))
  return FakePopen.started


def fake_jobs(tmp_path, monkeypatch, platform: str = "cpu", count: int = 0,
              points: int = 4) -> list[tuple]:
  """``points`` points of NUM_STEPS steps, trained by FakePopen on ``count`` ``platform``
  devices."""
  FakePopen.started, FakePopen.live, FakePopen.peak = [], 0, 0
  monkeypatch.setattr(sweep.subprocess, "Popen", FakePopen)
  monkeypatch.setattr(sweep, "local_devices", lambda: (platform, count), raising=False)
  config = config_lib.base_config()
  config.train.num_steps = FakePopen.NUM_STEPS
  return [({"seed": i}, {"seed": i}, config, tmp_path / f"seed={i}") for i in range(points)]


def test_a_point_stopped_before_its_num_steps_is_not_done(tmp_path, monkeypatch, capsys):
  """A point stopped by SIGTERM saves its step and exits 0: it is reported, not marked done,
  and the next run of the sweep continues it."""
  monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: None, raising=False)
  jobs = fake_jobs(tmp_path, monkeypatch, points=1)
  monkeypatch.setattr(FakePopen, "reach", 1)
  failed = sweep.run("configs/default.py:runlocal", jobs, 1)
  assert failed == [os.fspath(tmp_path / "seed=0" / "sweep.log")]
  assert not (tmp_path / "seed=0" / sweep.DONE).exists()
  assert "point seed=0 stopped at step 1 of 3 (exit 0)" in capsys.readouterr().out
  monkeypatch.setattr(FakePopen, "reach", 3)
  assert sweep.run("configs/default.py:runlocal", jobs, 1) == []
  assert len(FakePopen.started) == 2 and (tmp_path / "seed=0" / sweep.DONE).exists()
  assert sweep.run("configs/default.py:runlocal", jobs, 1) == []
  assert len(FakePopen.started) == 2  # done: not run again


def test_two_sweeps_in_one_workdir_refuse_the_second(tmp_path, monkeypatch):
  from test_workdir import hold_lock
  monkeypatch.setattr(os, "sched_setaffinity", lambda pid, cores: None, raising=False)
  fd = hold_lock(tmp_path)
  try:
    with pytest.raises(config_lib.ConfigError, match=r"is in use by launch.train \(pid 4242 "
                                                     r"on host elsewhere"):
      sweep.run("configs/default.py:runlocal", fake_jobs(tmp_path, monkeypatch), 2)
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
      with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
        pids = [int(p) for p in f.read().split()]
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
    log = next((tmp_path / "run").glob("*/sweep.log")).read_text()
    assert "SIGTERM: stopping at step" in log, log[-2000:]
  finally:
    os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the sweep's session
