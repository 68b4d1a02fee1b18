"""Multi-host path on one machine: 2 processes x 4 CPU devices == 1 process x 8 devices;
a process that dies ends the job in bounded time; SIGTERM stops every process at one step."""

import contextlib
import os
import re
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # processes of their own: the slow tier

from xlps import checkpoint as checkpoint_lib

from helpers import ROOT, logged_losses, records, run_command, short_run

# launch.train --heartbeat_timeout_seconds in the failure tests (the default is 60 s): the
# time a surviving process may take to notice that another one died.
HEARTBEAT_TIMEOUT = 10


def train_args(workdir, data_dir, steps):
  """``short_run`` on a data=4 x fsdp=2 mesh, reading 2 shards, to step 8 at most."""
  return short_run(workdir, data_dir, steps, {
      "data.num_shards": 2,  # same data order for 1 and 2 processes
      "mesh.data": 4, "mesh.fsdp": 2, "train.decay_steps": 8,
      "train.checkpoint_every_steps": 4, "train.eval_every_steps": 8})


def run_multiprocess(workdir, data_dir, steps, tmp_path):
  env = dict(os.environ, LOG_PREFIX=str(tmp_path / f"proc_{steps}_"))
  env.pop("XLA_FLAGS", None)
  out = run_command(["bash", "launch/local_multiprocess.sh", "2", "4", "--",
                     *train_args(workdir, data_dir, steps)], env=env)
  logs = "".join(p.read_text() for p in sorted(tmp_path.glob(f"proc_{steps}_*.log")))
  assert out.returncode == 0, out.stdout + out.stderr + logs[-4000:]
  return logs


def test_two_processes_train_checkpoint_resume_like_one(tmp_path, data_dir):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  ref = run_command(train_args(tmp_path / "one", data_dir, 8), env=env)
  assert ref.returncode == 0, ref.stderr[-4000:]
  run_multiprocess(tmp_path / "two", data_dir, 4, tmp_path)
  logs = run_multiprocess(tmp_path / "two", data_dir, 8, tmp_path)  # resumes at step 4
  assert "Resumed from" in logs
  one, two = logged_losses(tmp_path / "one"), logged_losses(tmp_path / "two")
  assert sorted(one) == sorted(two) == list(range(1, 9))  # only process 0 writes metrics
  np.testing.assert_allclose([two[s] for s in range(1, 9)], [one[s] for s in range(1, 9)],
                             rtol=1e-5)
  rows = {wd: [r for r in records(tmp_path / wd) if "train_loss" in r] for wd in ("one", "two")}
  for wd, logged in rows.items():
    for r in logged:  # global batch 8 x seq_len 32, counted once for all processes
      assert r["tokens_per_sec"] / r["steps_per_sec"] == pytest.approx(8 * 32, rel=1e-9), wd
  ratio = (np.median([r["tokens_per_sec"] for r in rows["two"]]) /
           np.median([r["tokens_per_sec"] for r in rows["one"]]))
  # The same global work on the same cores: never more tokens/s with two processes (CPU
  # collectives between processes make them ~10x slower here, so no lower "same order").
  print(f"tokens/s, 2 processes / 1 process: {ratio:.3f}")
  assert 0.01 < ratio < 1.5, ratio
  evals = {wd: {r["step"]: r["eval_loss"] for r in records(tmp_path / wd) if "eval_loss" in r}
           for wd in ("one", "two")}
  np.testing.assert_allclose(evals["two"][8], evals["one"][8], rtol=1e-5)  # sharded eval
  states = []
  for wd in ("one", "two"):
    ckpt = checkpoint_lib.Checkpointer(tmp_path / wd / "checkpoints", async_save=False)
    assert ckpt.latest_step() == 8
    states.append(ckpt.restore(8)[0])
    ckpt.close()
  for a, b in zip(jax.tree.leaves(states[0]["params"]), jax.tree.leaves(states[1]["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def failure_args(workdir, data_dir, steps, checkpoint_every, async_checkpoints=True):
  """``short_run`` on the 2-process mesh with a short heartbeat timeout."""
  return [*short_run(workdir, data_dir, steps, {
      "data.num_shards": 2, "mesh.data": 4, "mesh.fsdp": 2,
      "train.checkpoint_every_steps": checkpoint_every,
      "train.async_checkpoints": async_checkpoints}),
          f"--heartbeat_timeout_seconds={HEARTBEAT_TIMEOUT}"]


@contextlib.contextmanager
def multiprocess(args, log_prefix):
  """launch/local_multiprocess.sh (2 x 4 devices) running ``args``: yields it and its
  processes' pids; kills whatever still runs when the test fails."""
  env = dict(os.environ, LOG_PREFIX=str(log_prefix))
  env.pop("XLA_FLAGS", None)
  launcher = subprocess.Popen(["bash", "launch/local_multiprocess.sh", "2", "4", "--", *args],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
  pids = []
  try:
    while len(pids) < 2:
      line = launcher.stdout.readline()
      assert line, launcher.communicate()
      if match := re.match(r"process \d+: pid (\d+)", line):
        pids.append(int(match.group(1)))
    yield launcher, pids
  finally:
    if launcher.poll() is None:  # the launcher waits for its processes: they may still run
      for pid in pids:
        with contextlib.suppress(ProcessLookupError):
          os.kill(pid, signal.SIGKILL)
      launcher.kill()
      launcher.communicate()


def wait_for_log(path, text, launcher, timeout=300):
  """Waits until ``text`` is in the log ``path`` while the launcher runs."""
  deadline = time.monotonic() + timeout
  while not (path.exists() and text in path.read_text()):
    assert launcher.poll() is None, launcher.communicate()
    assert time.monotonic() < deadline, f"no {text!r} in {path} after {timeout} s"
    time.sleep(0.1)


def test_killed_process_ends_the_other_in_bounded_time_and_restart_resumes(tmp_path, data_dir):
  # Synchronous checkpoints: when process 0 logs step 7, step 6's checkpoint is complete.
  args = failure_args(tmp_path / "wd", data_dir, 10, checkpoint_every=2, async_checkpoints=False)
  with multiprocess(args, tmp_path / "kill_") as (launcher, pids):
    wait_for_log(tmp_path / "kill_0.log", "step 7/10", launcher)
    os.kill(pids[1], signal.SIGKILL)
    killed = time.monotonic()
    out, err = launcher.communicate(timeout=HEARTBEAT_TIMEOUT + 120)
    elapsed = time.monotonic() - killed
  survivor = (tmp_path / "kill_0.log").read_text()
  print(f"process 0 exited {elapsed:.1f} s after process 1 was killed")
  assert launcher.returncode == 1, out + err
  assert "process 1 failed with exit status 137 (killed by signal 9)" in err, err
  assert "process 0 failed" in err, err  # non-zero: JAX's abort (134) or ExitOnError (1)
  # JAX's "Terminating process because the JAX distributed service detected fatal errors.
  # This most likely indicates that another task died" (heartbeat timeout), or, when gloo
  # noticed the closed connection first, ExitOnError's hint.
  assert re.search(r"another (task|process) died", survivor), survivor[-3000:]
  assert elapsed < HEARTBEAT_TIMEOUT + 10, elapsed

  restart = tmp_path / "restart_"
  env = dict(os.environ, LOG_PREFIX=str(restart))
  env.pop("XLA_FLAGS", None)
  out = run_command(["bash", "launch/local_multiprocess.sh", "2", "4", "--", *args], env=env)
  logs = "".join((tmp_path / f"restart_{i}.log").read_text() for i in range(2))
  assert out.returncode == 0, out.stdout + out.stderr + logs[-4000:]
  resumed = int(re.search(r"Resumed from \S+ at step (\d+)", logs).group(1))
  assert 6 <= resumed < 10, resumed
  assert sorted(logged_losses(tmp_path / "wd")) == list(range(1, 11))


def test_sigterm_stops_every_process_at_one_step_with_one_checkpoint(tmp_path, data_dir):
  # No periodic checkpoint before step 100: the only one is the preemption checkpoint.
  args = failure_args(tmp_path / "wd", data_dir, 100, checkpoint_every=100)
  with multiprocess(args, tmp_path / "term_") as (launcher, pids):
    wait_for_log(tmp_path / "term_0.log", "step 3/100", launcher)
    # Process 1 first, then (through the launcher, which forwards it) both: the processes see
    # SIGTERM at different steps, but they must leave the loop at the same one.
    os.kill(pids[1], signal.SIGTERM)
    time.sleep(1.0)
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=120)
  logs = [(tmp_path / f"term_{i}.log").read_text() for i in range(2)]
  assert launcher.returncode == 0, out + err + logs[0][-3000:] + logs[1][-3000:]
  stops = [re.findall(r"SIGTERM: stopping at step (\d+)", log) for log in logs]
  assert len(stops[0]) == len(stops[1]) == 1 and stops[0] == stops[1], stops
  step = int(stops[0][0])
  assert 3 <= step < 100
  assert "stopped by SIGTERM" in logs[0]
  steps = sorted(int(p.name) for p in (tmp_path / "wd" / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps == [step], steps
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "wd" / "checkpoints", async_save=False)
  assert int(ckpt.restore(step)[0]["step"]) == step
  ckpt.close()
