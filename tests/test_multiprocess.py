"""Multi-host path on one machine: 2 processes x 4 CPU devices == 1 process x 8 devices."""

import os

import jax
import numpy as np
import pytest

from xlps import checkpoint as checkpoint_lib

from helpers import logged_losses, records, run_command, short_run


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
