"""The non-finite guard: a diverged run stops (or skips updates) and never saves NaN/Inf."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_command, short_run, tiny
from xlps import checkpoint as checkpoint_lib
from xlps import config as config_lib
from xlps import models, train


def one_step(skip: bool, poison: bool):
  spec = models.spec_of(tiny())
  params = jax.tree.map(np.asarray, models.nn.unbox(models.init_params(spec)))
  t = config_lib.train_config()
  t.warmup_steps = 0
  optimizer = train.make_optimizer(t)
  state = train.state_of(params, optimizer, 0)
  batch = models.example_batch(spec, length=8)
  weights = jnp.ones((2, 8)).at[0, 3].set(jnp.nan if poison else 1.0)
  batch = {**batch, "targets": batch["inputs"], "weights": weights}
  new, metrics = train.train_step(state, batch, model=models.build(spec), optimizer=optimizer,
                                  skip_nonfinite=skip)
  return state, new, metrics


def test_skip_keeps_params_and_optimizer_state_on_a_nonfinite_step():
  state, new, metrics = one_step(skip=True, poison=True)
  assert int(new.step) == int(state.step) + 1 and float(metrics["nonfinite"]) == 1.0
  for a, b in zip(jax.tree.leaves((state.params, state.opt_state)),
                  jax.tree.leaves((new.params, new.opt_state))):
    np.testing.assert_array_equal(a, b)
  # The sums count nothing of it, but the tokens it ran on (no segment_ids: no padding).
  assert all(float(v) == 0.0 for k, v in metrics.items() if k not in ("nonfinite", "useful_tokens"))
  assert float(metrics["useful_tokens"]) == 2 * 8


@pytest.mark.parametrize("skip", [True, False])
def test_finite_steps_update_in_both_modes(skip):
  state, new, metrics = one_step(skip=skip, poison=False)
  assert float(metrics["nonfinite"]) == 0.0 and np.isfinite(float(metrics["loss_sum"]))
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state.params),
                                                      jax.tree.leaves(new.params))]
  assert any(changed)


def test_without_skip_a_nonfinite_step_poisons_the_params():
  _, new, metrics = one_step(skip=False, poison=True)
  assert float(metrics["nonfinite"]) == 1.0
  assert not all(np.isfinite(x).all() for x in jax.tree.leaves(new.params))


def test_window_checks():
  ckpt = type("Ckpt", (), {"latest_step": lambda self: 4, "directory": "/w/checkpoints"})()
  record = {"nonfinite_steps": 1.0, "train_loss": float("nan"), "grad_norm": float("nan")}
  with pytest.raises(train.NonFiniteError, match=r"diverged at step 7: 1 of the last 3 steps"
                                                 r".*the last checkpoint is step 4 in "
                                                 r"/w/checkpoints.*learning_rate"):
    train._check_window(dict(record), 3, 7, "stop", ckpt)
  train._check_window(dict(record), 3, 7, "skip", ckpt)  # some steps still trained
  with pytest.raises(train.NonFiniteError, match="all of the last 3 steps"):
    train._check_window({**record, "nonfinite_steps": 3.0}, 3, 7, "skip", ckpt)


@pytest.mark.slow
def test_diverging_learning_rate_stops_and_keeps_the_last_finite_checkpoint(tmp_path, data_dir):
  """A run resumed with a learning rate that diverges exits 1 with the step and the last
  checkpoint named; with keep_checkpoints=1 that checkpoint is still there and finite."""
  wd = tmp_path / "wd"
  keep_one = {"train.keep_checkpoints": 1, "train.warmup_steps": 0}
  ok = run_command(short_run(wd, data_dir, 4, keep_one))
  assert ok.returncode == 0, ok.stderr[-3000:]
  bad = run_command(short_run(wd, data_dir, 12, {**keep_one, "train.learning_rate": 1e30,
                                                  "train.decay_steps": 12}))
  assert bad.returncode == 1, bad.stderr[-3000:]
  assert "error: training diverged at step" in bad.stderr
  assert f"the last checkpoint is step 4 in {wd / 'checkpoints'}" in bad.stderr
  assert "Traceback" not in bad.stderr
  ckpt = checkpoint_lib.Checkpointer(wd / "checkpoints", async_save=False)
  assert ckpt.all_steps() == [4]
  state, _, _ = ckpt.restore(4)
  ckpt.close()
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))
