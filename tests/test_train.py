"""Training end to end: every family learns; resume is exact; bad input is a clear error."""

import pathlib
import re
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from configs import albert, default, transformer
from xlps import checkpoint as checkpoint_lib
from xlps import config as config_lib
from xlps import data as data_lib
from xlps import train

from helpers import ROOT, logged_losses, records, run_command, short_run, tensorboard_steps


def shrink(config, data_dir, steps=12):
  """Tiny model and short run for CPU tests."""
  m = config.model
  m.d_model, m.num_heads, m.num_kv_heads, m.d_ff = 32, 2, 0, 64
  m.embed_dim = min(m.embed_dim, 16) if m.embed_dim else 0
  m.num_layers, m.max_len = 3, 32
  if m.family == "encoder_decoder":
    m.num_decoder_layers = 3
    m.sharing.num_unique = 1
  config.data.data_dir = str(data_dir)
  config.data.seq_len = 32
  config.data.eval_batches = 2
  t = config.train
  t.num_steps, t.batch_size, t.learning_rate, t.warmup_steps = steps, 8, 3e-3, 2
  t.log_every_steps, t.eval_every_steps, t.checkpoint_every_steps = 1, steps, 4
  t.decay_steps = steps
  return config


def final_params(workdir, reference_state):
  ckpt = checkpoint_lib.Checkpointer(pathlib.Path(workdir) / "checkpoints", async_save=False)
  state, _, meta = ckpt.restore(ckpt.latest_step(), checkpoint_lib.abstract_like(reference_state))
  ckpt.close()
  return state, meta


def mlm_config():
  c = albert.get_config("base")
  c.model.vocab_size = 300
  return c


@pytest.mark.parametrize("make", [
    lambda: default.get_config("tied"),
    mlm_config,
    pytest.param(lambda: transformer.get_config("tied,runlocal"), marks=pytest.mark.slow),
], ids=["decoder_lm", "encoder_mlm", "encoder_decoder"])
def test_each_family_learns(make, tmp_path, data_dir):
  config = shrink(make(), data_dir, steps=30)
  if config.model.family == "encoder_decoder":
    config.data.name, config.data.task = "algorithmic", "copy"
    config.data.train_max_len, config.data.test_max_len = 8, 12
    config.data.num_train_examples, config.data.num_eval_examples = 2000, 64
  config.model.dropout_rate = 0.0
  config.train.learning_rate = 1e-2
  result = train.train_and_evaluate(config, tmp_path / "wd")
  curve = [logged_losses(tmp_path / "wd")[s] for s in range(1, 31)]
  assert np.mean(curve[-5:]) < 0.8 * np.mean(curve[:5]), curve
  assert result["step"] == 30 and "eval_loss" in result["last_eval"]


def test_resume_is_exact(tmp_path, data_dir):
  config = shrink(default.get_config("tied"), data_dir, steps=8)
  config.model.dropout_rate = 0.1  # dropout keys must also continue exactly
  full = train.train_and_evaluate(config, tmp_path / "full")
  config.train.num_steps = 4
  train.train_and_evaluate(config, tmp_path / "split")
  config.train.num_steps = 8  # extend: resumes from step 4
  resumed = train.train_and_evaluate(config, tmp_path / "split")
  assert logged_losses(tmp_path / "full") == logged_losses(tmp_path / "split")  # bitwise
  for a, b in zip(jax.tree.leaves(full["state"]), jax.tree.leaves(resumed["state"])):
    np.testing.assert_array_equal(a, b)
  state, meta = final_params(tmp_path / "split", full["state"])
  for a, b in zip(jax.tree.leaves(full["state"]), jax.tree.leaves(state)):
    np.testing.assert_array_equal(a, b)
  assert meta["sharing"]["attention"] == [0, 0, 0]
  assert meta["config"]["model"]["num_layers"] == 3 and "jax" in meta["versions"]


def wait_for_checkpoint(workdir, proc, min_step, timeout=240):
  """Waits until a finalized checkpoint >= min_step exists (Orbax renames when complete)."""
  ckpts = pathlib.Path(workdir) / "checkpoints"
  deadline = time.time() + timeout
  while time.time() < deadline:
    steps = [int(p.name) for p in ckpts.glob("*") if p.name.isdigit()] if ckpts.exists() else []
    if steps and max(steps) >= min_step:
      return max(steps)
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.05)
  raise AssertionError("no checkpoint appeared")


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_resume(tmp_path, data_dir):
  steps = 40
  ref = run_command(short_run(tmp_path / "ref", data_dir, steps))
  assert ref.returncode == 0, ref.stderr[-3000:]
  proc = subprocess.Popen(short_run(tmp_path / "killed", data_dir, steps), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  killed_at = wait_for_checkpoint(tmp_path / "killed", proc, 4)
  while max(r["step"] for r in records(tmp_path / "killed")) <= killed_at + 1:
    assert proc.poll() is None, "finished before rows past its checkpoint were written"
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert killed_at < steps
  again = run_command(short_run(tmp_path / "killed", data_dir, steps))
  assert again.returncode == 0, again.stderr[-3000:]
  assert "Resumed from" in again.stderr
  ref_losses, got = logged_losses(tmp_path / "ref"), logged_losses(tmp_path / "killed")
  assert ref_losses == got
  # Every step is recorded once, in metrics.jsonl and in TensorBoard (no rows repeated from
  # the steps between the checkpoint and the kill).
  ref_steps = [r["step"] for r in records(tmp_path / "ref")]
  assert [r["step"] for r in records(tmp_path / "killed")] == ref_steps == list(range(1, steps + 1))
  tb_steps = tensorboard_steps(tmp_path / "killed")
  assert tb_steps == tensorboard_steps(tmp_path / "ref") and tb_steps["train_loss"] == ref_steps
  finals = []
  for wd in ("ref", "killed"):
    ckpt = checkpoint_lib.Checkpointer(tmp_path / wd / "checkpoints", async_save=False)
    assert ckpt.latest_step() == steps
    finals.append(ckpt.restore(steps)[0])
    ckpt.close()
  leaves = [jax.tree_util.tree_leaves_with_path(f) for f in finals]
  assert len(leaves[0]) == len(leaves[1]) > 10
  for (path, a), (_, b) in zip(*leaves):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path, data_dir):
  proc = subprocess.Popen(short_run(tmp_path / "wd", data_dir, 400), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  wait_for_checkpoint(tmp_path / "wd", proc, 2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  assert "SIGTERM at step" in err or "stopped by SIGTERM" in out
  logged = max(logged_losses(tmp_path / "wd"))
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "wd" / "checkpoints", async_save=False)
  assert ckpt.latest_step() == logged < 400  # the step it stopped at was saved
  ckpt.close()


def test_unwritable_workdir_is_clear(tmp_path, data_dir):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  config = shrink(default.get_config("tied"), data_dir)
  with pytest.raises(ValueError, match=r"workdir=.*file/wd.* cannot be written"):
    train.train_and_evaluate(config, blocker / "wd")


@pytest.mark.slow
def test_readme_main_job_summary(tmp_path, data_dir):
  out = run_command(short_run(tmp_path / "wd", data_dir, 6))
  assert out.returncode == 0, out.stderr[-3000:]
  for needle in ("unique", "validation loss", "unigram baseline", "tokens/s", "checkpoints:",
                 "metrics:"):
    assert needle in out.stdout, (needle, out.stdout)
  assert (tmp_path / "wd" / "loss.png").stat().st_size > 1000
  assert list((tmp_path / "wd" / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_resume_onto_a_different_mesh(tmp_path, data_dir):
  config = shrink(default.get_config("tied"), data_dir, steps=8)
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 8, 1, 1
  full = train.train_and_evaluate(config, tmp_path / "full")
  config.train.num_steps = 4
  train.train_and_evaluate(config, tmp_path / "moved")
  config.train.num_steps = 8
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = 1, 4, 2
  moved = train.train_and_evaluate(config, tmp_path / "moved")
  kernel = moved["state"].params["decoder"]["layers"]["mlp"]["wi"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
  assert {s.data.shape for s in kernel.addressable_shards} == {(32 // 4, 64 // 2)}
  a, b = logged_losses(tmp_path / "full"), logged_losses(tmp_path / "moved")
  assert sorted(a) == sorted(b)
  np.testing.assert_allclose([b[s] for s in sorted(b)], [a[s] for s in sorted(a)], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(full["state"].params), jax.tree.leaves(moved["state"].params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


def test_logging_evaluation_and_checkpoints_are_independent(tmp_path, data_dir):
  config = shrink(mlm_config(), data_dir, steps=6)
  t = config.train
  t.log_every_steps, t.eval_every_steps, t.checkpoint_every_steps = 3, 2, 5
  t.keep_checkpoints = 5
  train.train_and_evaluate(config, tmp_path / "wd")
  rows = records(tmp_path / "wd")
  assert [r["step"] for r in rows if "train_loss" in r] == [3, 6]
  assert [r["step"] for r in rows if "eval_loss" in r] == [2, 4, 6]
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "wd" / "checkpoints", async_save=False)
  assert ckpt.all_steps() == [5, 6]
  ckpt.close()
  # Throughput counts every position the model ran on (MLM weights only ~15% of them),
  # once globally: batch 8 x seq_len 32 tokens per step.
  for r in rows:
    if "train_loss" in r:
      assert r["tokens_per_sec"] / r["steps_per_sec"] == pytest.approx(8 * 32, rel=1e-9)


def expected_tokens(family: str, batch) -> tuple[int, float]:
  """(processed tokens, non-pad fraction) of one global batch, from its padding keys."""
  if family == "encoder_decoder":
    sizes = batch["inputs"].size + batch["targets"].size
    return sizes, (np.count_nonzero(batch["inputs"]) + np.count_nonzero(batch["targets"])) / sizes
  mark = batch["segment_ids"] if family == "decoder_lm" else batch["input_mask"]
  return batch["inputs"].size, np.count_nonzero(mark) / mark.size


def check_token_rates(config, rows: list[dict], flops_over_peak: float | None = None) -> None:
  """Each logged step's processed tokens/s, useful tokens/s and padding fraction against the
  same step's batch, read again from the pipeline (the run logs every step); with
  ``flops_over_peak`` (per target position), MFU too."""
  batches = data_lib.build(config).train_iter()
  train_rows = [r for r in rows if "train_loss" in r]
  assert [r["step"] for r in train_rows] == list(range(1, config.train.num_steps + 1))
  for r in train_rows:
    batch = next(batches)
    processed, fraction = expected_tokens(config.model.family, batch)
    assert r["tokens_per_sec"] / r["steps_per_sec"] == pytest.approx(processed, rel=1e-9)
    assert r["useful_tokens_per_sec"] / r["tokens_per_sec"] == pytest.approx(fraction, rel=1e-6)
    assert r["padding_fraction"] == pytest.approx(1 - fraction, abs=1e-6)
    if flops_over_peak is not None:  # MFU stays on the FLOPs run, padding included
      assert r["mfu"] / r["steps_per_sec"] == pytest.approx(
          flops_over_peak * batch["targets"].size, rel=1e-9)
  batches.close()


def algorithmic_copy(config) -> None:
  """``config`` trains on copy with lengths 1..8: rows padded to the longest example."""
  config.data.name, config.data.task = "algorithmic", "copy"
  config.data.train_max_len, config.data.test_max_len = 8, 12


@pytest.mark.parametrize("make", [lambda: default.get_config("tied"), mlm_config],
                         ids=["decoder_lm", "encoder_mlm"])
def test_useful_tokens_are_the_non_pad_positions(make, tmp_path, data_dir):
  """Throughput reports processed and useful (non-pad) tokens/s; their ratio is the batch's
  non-pad fraction (decoder_lm on copy: ``source EOS target EOS`` rows of varying length;
  encoder_mlm: packed text, its input_mask)."""
  config = shrink(make(), data_dir, steps=3)
  if config.model.family == "decoder_lm":
    algorithmic_copy(config)
  result = train.train_and_evaluate(config, tmp_path / "wd")
  check_token_rates(config, records(tmp_path / "wd"),
                    result["summary"]["flops_per_token"] / result["peak_flops"])
  assert {"useful_tokens_per_sec", "padding_fraction"} <= set(tensorboard_steps(tmp_path / "wd"))
  if config.model.family == "decoder_lm":
    assert 0.1 < np.mean([h["padding_fraction"] for h in result["history"]
                          if "padding_fraction" in h]) < 0.9


@pytest.mark.slow
def test_progress_line_and_summary_show_processed_and_useful_tokens(tmp_path, data_dir):
  """launch.train on a padded seq2seq task: the progress lines, metrics.jsonl and the final
  summary carry processed and useful tokens/s; encoder_decoder counts source and target."""
  overrides = {"data.name": "algorithmic", "data.task": "copy", "data.train_max_len": 8,
               "data.test_max_len": 12, "train.checkpoint_every_steps": 3}
  out = run_command(short_run(tmp_path / "wd", data_dir, 3, overrides,
                              config="configs/transformer.py:tied,runlocal"), timeout=300)
  assert out.returncode == 0, out.stderr
  progress = [line for line in out.stderr.splitlines() if "| loss " in line]
  assert len(progress) == 3, out.stderr
  for line in progress:
    assert re.search(r"\d+ tok/s processed, \d+ useful \(\d+\.\d% padding\)", line), line
  line = re.search(r"throughput \(median of 3 logged windows\): (\d+) tokens/s processed, "
                   r"(\d+) useful \(non-pad; (\d+\.\d)% padding\)", out.stdout)
  assert line, out.stdout
  processed, useful, padding = map(float, line.groups())  # one window's numbers: they agree
  assert useful / processed == pytest.approx(1 - padding / 100, abs=2e-3 + 1 / processed)
  config = transformer.get_config("tied,runlocal")  # what short_run ran: same batches
  config.data.data_dir, config.data.seq_len, config.model.max_len = str(data_dir), 32, 32
  config.train.batch_size, config.train.num_steps = 8, 3
  algorithmic_copy(config)
  check_token_rates(config, records(tmp_path / "wd"))


@pytest.mark.parametrize("section,key,value,message", [
    ("data", "seq_len", 64, r"data.seq_len=64 exceeds model.max_len=32"),
    ("train", "batch_size", 12, r"train.batch_size=12 must be a multiple of the mesh's data x "
                                r"fsdp = 8 x 1 = 8"),
    ("train", "eval_every_steps", 0, r"train.eval_every_steps=0 must be an integer >= 1"),
    ("train", "warmup_steps", -1, r"train.warmup_steps=-1 must be an integer >= 0"),
    ("train", "b2", 1.0, r"train.b2=1.0 must be a number >= 0 and < 1"),
    ("model", "vocab_size", 100, r"model.vocab_size=100 is smaller than the byte tokenizer's"),
])
def test_bad_config_refused_before_any_work(section, key, value, message, data_dir):
  config = shrink(default.get_config("tied"), data_dir)
  config[section][key] = value
  with pytest.raises(ValueError, match=message):
    config_lib.validate(config)


def test_seq_len_beyond_max_len_never_trains(tmp_path, data_dir):
  config = shrink(default.get_config("tied"), data_dir, steps=4)
  config.data.seq_len = 40  # learned positions 32..39 do not exist
  with pytest.raises(ValueError, match="data.seq_len=40 exceeds model.max_len=32"):
    train.train_and_evaluate(config, tmp_path / "wd")
  assert not (tmp_path / "wd" / "checkpoints").exists()


@pytest.mark.slow
def test_ut_algorithmic_config_learns_to_copy():
  """configs/ut_algorithmic.py learns copy (length 8, fresh digits every step) in 1200 Adam
  steps. Without ``scale_embeddings`` its N(0, 0.02) token embeddings drown in the
  amplitude-1 sinusoidal positions and the loss stayed at chance (2.05) over 800 steps."""
  import jax.numpy as jnp
  import optax
  from configs import ut_algorithmic
  from xlps import models
  from xlps.data import tokenizers
  config = ut_algorithmic.get_config("copy,runlocal")
  config.model.dropout_rate = 0.0
  model = models.build(config.model)
  params = models.init_params(config.model, seed=0)
  optimizer = optax.adam(1e-3)
  opt_state = optimizer.init(params)

  def loss_fn(p, batch):
    logp = jax.nn.log_softmax(model.apply({"params": p}, batch))
    return -jnp.take_along_axis(logp, batch["targets"][..., None], -1).mean()

  @jax.jit
  def step(p, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(p, batch)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, loss

  rng = np.random.default_rng(0)
  digits = tokenizers.NUM_SPECIAL + ord("0")
  for _ in range(1200):
    source = rng.integers(0, 10, (32, 8)) + digits
    batch = {"inputs": jnp.asarray(np.pad(source, ((0, 0), (0, 1)))),
             "targets": jnp.asarray(np.pad(source, ((0, 0), (0, 1)), constant_values=tokenizers.EOS))}
    params, opt_state, loss = step(params, opt_state, batch)
  assert float(loss) < 0.5, float(loss)


@pytest.mark.slow
def test_mfu_counts_truncated_iterations_forward_only(tmp_path, data_dir):
  """A looped model at r = 2 iterations with k = 1: MFU counts the first iteration at
  forward cost (a third of a trained layer), not the FLOPs of every layer trained."""
  config = shrink(default.get_config("tied"), data_dir, steps=2)
  config.model.sharing = config_lib.sharing_config()
  config.model.num_layers = 4  # prelude 1, core 1 x up to 2 iterations, coda 1
  config.model.loop.update(prelude=1, core=1, coda=1, inject="add", backprop_iterations=1)
  result = train.train_and_evaluate(config, tmp_path / "wd")
  summary = result["summary"]
  layer = summary["adaptive_depth"]["layer_flops_per_token"]["decoder"]
  applied = summary["flops_per_token"] - layer * 2 // 3  # by hand: iteration 1 forward only
  check_token_rates(config, records(tmp_path / "wd"), applied / result["peak_flops"])


@pytest.mark.slow
def test_continuing_a_finished_run_keeps_its_schedule(tmp_path, data_dir):
  """decay_steps = 0 follows num_steps of the run's first start: continuing a finished
  4-step run to 8, then 10 steps trains on at the final rate, with no jump at the resume
  step; learning_rate (the rate of the row's last update) is in every row and TensorBoard."""
  config = shrink(default.get_config("tied"), data_dir, steps=4)
  t = config.train
  t.decay_steps, t.learning_rate, t.warmup_steps, t.end_lr_factor = 0, 3e-3, 2, 0.1
  for steps in (4, 8, 10):
    t.num_steps = steps
    train.train_and_evaluate(config, tmp_path / "wd")
  rows = {r["step"]: r["learning_rate"] for r in records(tmp_path / "wd") if "train_loss" in r}
  # optax: 0 -> 3e-3 linearly over 2 updates, then cosine to 3e-4 at update 4, then 3e-4.
  by_hand = [0.0, 1.5e-3, 3e-3, 3e-4 + 2.7e-3 * 0.5] + [3e-4] * 6
  np.testing.assert_allclose([rows[s] for s in range(1, 11)], by_hand, rtol=1e-6)
  assert tensorboard_steps(tmp_path / "wd")["learning_rate"] == list(range(1, 11))


def test_schedule_on_resume_is_the_recorded_one_unless_decay_steps_is_set():
  """The README's case: a finished 400-step run (warmup 30, 3e-3 -> 3e-4) continued with
  num_steps=800 stays at 3e-4; an explicit decay_steps=800 is followed and the note names
  the jump; checkpoints without the record use their config; step 0 has no schedule yet."""
  t = config_lib.train_config()
  t.num_steps, t.warmup_steps, t.learning_rate, t.end_lr_factor = 800, 30, 3e-3, 0.1
  old = {"config": {"train": {"decay_steps": 0, "num_steps": 400}}}
  assert train.recorded_horizon(old, 400) == 400
  assert train.recorded_horizon({**old, "schedule": {"decay_steps": 300}}, 600) == 300
  assert train.recorded_horizon(old, 0) is None and train.recorded_horizon(None, 0) is None
  assert train.schedule_horizon(t, 400) == 400 and train.schedule_horizon(t, None) == 800
  rates = [float(train.make_schedule(t, train.schedule_horizon(t, 400))(c)) for c in (399, 400)]
  np.testing.assert_allclose(rates, [3.0e-4, 3.0e-4], rtol=1e-3)
  assert train.schedule_note(t, 400, 400) == (
      "continuing on the schedule this run started with (warmup + cosine over 400 updates): "
      "updates 401..800 run at its final rate 0.0003 (learning_rate x end_lr_factor); set "
      "--config.train.decay_steps to stretch the cosine instead")
  t.decay_steps = 800
  assert train.schedule_horizon(t, 400) == 800
  assert train.schedule_note(t, 400, 400) == (
      "train.decay_steps=800 changes the schedule this run followed (decay_steps 400): the "
      "learning rate at update 401 goes from 0.0003 to 0.00173")
  assert train.schedule_note(t, None, 0) is None


def test_shipped_variants_reach_their_peak_rate():
  """Every shipped config variant (runlocal included) ends its warmup before its last step
  (issue 23 item 5: runlocal had warmup 30 of 20 steps); an explicit decay_steps may stop a
  run inside its warmup."""
  from configs import recursive, ut_algorithmic
  variants = {default: ("tied", "unshared", "cycle", "sequence", "cycle_rev"),
              albert: ("base", "bert_base"), transformer: ("vanilla", "tied", "cycle_rev"),
              ut_algorithmic: ("copy", "reverse", "addition"),
              recursive: ("middle_cycle", "relaxed", "mor_expert", "mor_token")}
  for module, names in variants.items():
    for arg in (a for name in names for a in (name, f"{name},runlocal")):
      t = module.get_config(arg).train
      config_lib.check_train(t)
      assert t.warmup_steps < (t.decay_steps or t.num_steps), (module.__name__, arg)
  t = config_lib.train_config()
  t.num_steps, t.warmup_steps = 10, 30
  with pytest.raises(config_lib.ConfigError, match=r"^train\.warmup_steps=30 >= "
                     r"train\.num_steps=10: the run ends inside its warmup"):
    config_lib.check_train(t)
  t.decay_steps = 400  # explicitly the first 10 updates of a 400-update schedule
  config_lib.check_train(t)


@pytest.mark.slow
def test_rerun_with_fewer_steps_says_the_checkpoint_is_past_them(tmp_path, data_dir):
  """A finished 4-step run re-run with num_steps=2 is a one-line error naming the step it
  is at (it exited 0 silently); with num_steps=4 it trains nothing and says it is done."""
  config = shrink(default.get_config("tied"), data_dir, steps=4)
  train.train_and_evaluate(config, tmp_path / "wd")
  config.train.num_steps = 2
  with pytest.raises(config_lib.ConfigError, match=r"^train\.num_steps=2, but the latest "
                     r"checkpoint in .*checkpoints is at step 4 already: nothing to train; "
                     r"valid: num_steps > 4 to continue this run"):
    train.train_and_evaluate(config, tmp_path / "wd")
  config.train.num_steps = 4
  again = train.train_and_evaluate(config, tmp_path / "wd")
  assert again["step"] == 4 and again["history"] == [] and again["compile_time"] == 0.0


# The keys of a metrics row that do not depend on wall-clock time.
DETERMINISTIC = ("train_loss", "train_accuracy", "grad_norm", "learning_rate",
                 "padding_fraction", "eval_loss", "eval_accuracy", "eval_perplexity")


@pytest.mark.slow
def test_resume_inside_a_logging_window_logs_the_uninterrupted_rows(tmp_path, data_dir):
  """Killed after the step-4 checkpoint (log every 3): the resumed run's step-6 row averages
  steps 4..6 as the uninterrupted run's does, not only 5..6 (issue 23 item 6)."""
  config = shrink(default.get_config("tied"), data_dir, steps=6)
  config.model.dropout_rate = 0.1
  t = config.train
  t.log_every_steps, t.checkpoint_every_steps, t.keep_checkpoints = 3, 2, 5
  train.train_and_evaluate(config, tmp_path / "full")
  shutil.copytree(tmp_path / "full", tmp_path / "killed")
  shutil.rmtree(tmp_path / "killed" / "checkpoints" / "6")  # killed before step 6 committed
  resumed = train.train_and_evaluate(config, tmp_path / "killed")
  assert resumed["history"][0]["step"] == 6

  def rows(workdir):
    return [{k: r[k] for k in ("step", *DETERMINISTIC) if k in r} for r in records(workdir)]
  assert rows(tmp_path / "killed") == rows(tmp_path / "full")  # bitwise
  assert [r["step"] for r in records(tmp_path / "full")] == [3, 6]
