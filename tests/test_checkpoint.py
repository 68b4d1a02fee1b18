"""Checkpoints: damaged ones are reported and skipped, another model's are refused (or moved
aside on request), retention keeps the newest plus multiples of a period and deletes only
after the newer checkpoint has committed."""

import asyncio
import json
import logging
import shutil
import threading
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorstore as ts
from orbax.checkpoint._src.path import atomicity

from configs import default
from helpers import configure
from xlps import checkpoint as checkpoint_lib
from xlps import config as config_lib
from xlps import interop, models, train

STATE = {"w": jnp.arange(2000.0), "b": {"c": jnp.ones((8, 8))}}


def state_at(step):
  return jax.tree.map(lambda x: x + step, STATE)


def save_steps(directory, steps, **options):
  ckpt = checkpoint_lib.Checkpointer(directory, async_save=False, **options)
  for step in steps:
    ckpt.save(step, state_at(step), {"next": step}, {"config": {}})
  ckpt.close()


def array_value(step_dir):
  """``(file, offset, length)`` of the state's largest out-of-line array value (the OCDBT
  b-tree of a small state is its root node; a data file may hold several values, and some
  files of the database may be unreferenced)."""
  kvstore = ts.KvStore.open(f"file://{step_dir / 'state'}/").result()
  root = ts.ocdbt.dump(kvstore).result()["versions"][-1]["root"]["location"]
  values = [e["indirect_value"] for e in ts.ocdbt.dump(kvstore, root).result()["entries"]
            if "indirect_value" in e]
  head, offset, length = max(values, key=lambda v: int(v.rsplit(":", 1)[1])).rsplit(":", 2)
  _, base, relative = head.split(":", 2)
  return step_dir / "state" / base / relative, int(offset), int(length)


def array_file(step_dir):
  return array_value(step_dir)[0]


def truncate(path, size=None):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2 if size is None else size])


def truncate_array(step_dir):
  """Cuts the file of the largest array value in the middle of that value."""
  path, offset, length = array_value(step_dir)
  truncate(path, offset + length // 2)
  return path


def resume(directory, **options):
  ckpt = checkpoint_lib.Checkpointer(directory, async_save=False, **options)
  try:
    return ckpt.restore_latest(checkpoint_lib.abstract_like(STATE)), ckpt.all_steps()
  finally:
    ckpt.close()


def warnings_of(caplog):
  return "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_array_file_falls_back_to_the_previous_step(damage, tmp_path, caplog):
  save_steps(tmp_path, [2, 4])
  bad = truncate_array(tmp_path / "4") if damage == "truncate" else array_file(tmp_path / "4")
  if damage == "delete":
    bad.unlink()
  with caplog.at_level(logging.WARNING):
    (step, state, data_state, _), steps = resume(tmp_path)
  assert step == 2 and data_state == {"next": 2} and steps == [2]
  np.testing.assert_array_equal(state["w"], np.arange(2000.0) + 2)
  text = warnings_of(caplog)
  assert "Checkpoint step 4" in text and str(bad) in text, text
  assert ("is truncated" if damage == "truncate" else "is missing") in text, text
  # Moved aside, never deleted, under a name Orbax does not list: step 4 can be saved again.
  aside = list(tmp_path.glob("4.damaged-*"))
  assert len(aside) == 1 and str(aside[0]) in text and aside[0].is_dir()
  save_steps(tmp_path, [4])
  assert resume(tmp_path)[0][0] == 4


def test_damaged_json_file_is_named(tmp_path, caplog):
  save_steps(tmp_path, [2, 4])
  truncate(tmp_path / "4" / "data" / "metadata")
  with caplog.at_level(logging.WARNING):
    assert resume(tmp_path)[0][0] == 2
  assert f"{tmp_path / '4' / 'data' / 'metadata'} is truncated or corrupt" in warnings_of(caplog)


def test_uncommitted_save_is_ignored(tmp_path, caplog):
  save_steps(tmp_path, [2])
  # What a save killed before Orbax's commit (rename) leaves: a temporary directory.
  shutil.copytree(tmp_path / "2", tmp_path / "4.orbax-checkpoint-tmp")
  truncate_array(tmp_path / "4.orbax-checkpoint-tmp")
  with caplog.at_level(logging.WARNING):
    (step, _, _, _), steps = resume(tmp_path)
  assert step == 2 and steps == [2]
  assert "4.orbax-checkpoint-tmp: a save that never committed" in warnings_of(caplog)
  save_steps(tmp_path, [4])  # a new save of that step replaces it
  assert resume(tmp_path)[0][0] == 4 and not (tmp_path / "4.orbax-checkpoint-tmp").exists()


def test_all_damaged_is_a_clear_error_and_nothing_moves(tmp_path):
  save_steps(tmp_path, [2, 4])
  array_file(tmp_path / "4").unlink()
  truncate(tmp_path / "2" / "metadata" / "metadata")
  with pytest.raises(config_lib.ConfigError) as error:
    resume(tmp_path)
  message = str(error.value)
  assert f"no checkpoint in {tmp_path} can be restored" in message
  assert "step 4: " in message and "is missing" in message
  assert f"step 2: {tmp_path / '2' / 'metadata' / 'metadata'} is truncated" in message
  assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "4"]


def test_retention_keeps_the_newest_and_multiples_of_the_period(tmp_path):
  save_steps(tmp_path, range(1, 11), max_to_keep=2, keep_every_steps=4)
  assert sorted(int(p.name) for p in tmp_path.iterdir()) == [4, 8, 9, 10]
  assert resume(tmp_path)[1] == [4, 8, 9, 10]


@pytest.fixture
def held_commit(monkeypatch):
  """Holds Orbax's commit (the rename of a step's temporary directory) until released;
  ``fail`` makes it raise instead."""
  control = {"release": threading.Event(), "entered": threading.Event(), "fail": False}
  commit = atomicity.on_commit_callback

  async def held(tmp_dir, **kwargs):
    control["entered"].set()
    await asyncio.to_thread(control["release"].wait, 60)
    if control["fail"]:
      raise OSError("disk full (simulated)")
    return await commit(tmp_dir, **kwargs)

  monkeypatch.setattr(atomicity, "on_commit_callback", held)
  return control


def test_old_checkpoint_is_deleted_only_after_the_new_one_commits(tmp_path, held_commit):
  ckpt = checkpoint_lib.Checkpointer(tmp_path, max_to_keep=1, async_save=True)
  held_commit["release"].set()
  ckpt.save(2, state_at(2), {}, {})
  ckpt._manager.wait_until_finished()
  held_commit["release"].clear()
  held_commit["entered"].clear()
  ckpt.save(4, state_at(4), {}, {})  # returns while the commit of step 4 is held
  assert held_commit["entered"].wait(60)  # step 4 written, its rename pending
  for _ in range(20):  # ample time for a premature deletion to show
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "2" in names and "4" not in names and "4.orbax-checkpoint-tmp" in names, names
    time.sleep(0.05)
  held_commit["release"].set()
  ckpt.close()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["4"]


def test_failed_commit_deletes_nothing(tmp_path, held_commit):
  ckpt = checkpoint_lib.Checkpointer(tmp_path, max_to_keep=1, async_save=True)
  held_commit["release"].set()
  ckpt.save(2, state_at(2), {}, {})
  ckpt._manager.wait_until_finished()
  held_commit["fail"] = True
  ckpt.save(4, state_at(4), {}, {})
  with pytest.raises(OSError, match="disk full"):
    ckpt.close()
  assert (tmp_path / "2").is_dir() and not (tmp_path / "4").exists()
  assert resume(tmp_path)[0][0] == 2


# ------------------------------------------------------------------------- model mismatch

def test_model_differences_name_each_field_and_skip_what_may_change():
  saved = config_lib.model_config()
  current = configure(config_lib.model_config(), num_layers=4, activation="relu",
                      dropout_rate=0.1, dtype="bfloat16", remat_policy="full",
                      scan_layers=False, init_std=0.01, attention_dropout_rate=0.1,
                      attention_impl="einsum",
                      sharing={"num_unique": 2, "mlp": {"num_unique": 4}})
  saved_dict = checkpoint_lib._as_dict(saved)
  assert checkpoint_lib.model_differences(saved_dict, current) == [
      "model.num_layers: checkpoint 6, config 4",
      "model.activation: checkpoint 'gelu', config 'relu'",
      "model.sharing.num_unique: checkpoint 1, config 2",
      "model.sharing.mlp.num_unique: checkpoint None, config 4"]
  # The same model written differently: derived values, an order that M=1 makes moot, keys
  # an older checkpoint lacks (their defaults).
  same = configure(config_lib.model_config(), embed_dim=256, num_kv_heads=4,
                   sharing={"order": "sequence"})
  del saved_dict["num_decoder_layers"], saved_dict["attention_impl"]
  assert checkpoint_lib.model_differences(saved_dict, same) == []
  assert set(checkpoint_lib.RESUMABLE_MODEL_KEYS) == {
      "dropout_rate", "attention_dropout_rate", "attention_impl", "init_std", "dtype",
      "scan_layers", "remat_policy", "remat_group_size", "loop.train_iterations",
      "loop.mean_iterations", "loop.backprop_iterations", "loop.eval_iterations",
      "loop.exit_threshold", "act.ponder_weight", "routing.aux_weight",
      "routing.balance_weight", "routing.z_weight"}


def test_model_differences_compare_kv_sharing_by_its_table():
  """K/V sharing changes the model: another table is refused, the same table written
  another way is not, and a checkpoint from before the key existed is per_layer."""
  cla2 = lambda: configure(config_lib.model_config(), num_layers=4,  # noqa: E731
                           kv_sharing={"policy": "cross_layer", "group_size": 2})
  saved = checkpoint_lib._as_dict(cla2())
  per_layer = configure(config_lib.model_config(), num_layers=4)
  assert checkpoint_lib.model_differences(saved, per_layer) == [
      "model.kv_sharing.policy: checkpoint 'cross_layer', config 'per_layer'",
      "model.kv_sharing.group_size: checkpoint 2, config 0"]
  as_table = configure(config_lib.model_config(), num_layers=4,
                       kv_sharing={"policy": "table", "table": "0 0 1 1"})
  assert checkpoint_lib.model_differences(saved, as_table) == []
  old = checkpoint_lib._as_dict(per_layer)
  del old["kv_sharing"]
  assert checkpoint_lib.model_differences(old, per_layer) == []
  assert checkpoint_lib.model_differences(old, cla2()) != []


LOOP_CHANGES = {"loop.train_iterations": "uniform", "loop.mean_iterations": 2,
                "loop.backprop_iterations": 1, "loop.eval_iterations": 2,
                "loop.exit_threshold": 0.1}
ROUTING_CHANGES = {"routing.aux_weight": 0.5, "routing.balance_weight": 0.5,
                   "routing.z_weight": 0.5}


def looped_model(routing: bool = False, **changes):
  """A looped decoder (3 core iterations) with per-layer LoRA, or with expert-choice routers,
  and dotted ``changes``."""
  model = configure(config_lib.model_config(), num_layers=5, d_model=16, num_heads=2, d_ff=32,
                    max_len=16, vocab_size=32)
  extra = {"routing.kind": "expert_choice"} if routing else {"lora.rank": 2,
                                                               "loop.mean_iterations": 3}
  for key, value in {"loop.prelude": 1, "loop.core": 1, "loop.coda": 1, **extra,
                     **changes}.items():
    section, leaf = key.split(".")
    model[section][leaf] = value
  return model


def test_resumable_loop_keys_change_no_parameter_shape():
  """issue 23 item 8: a looped run with another iteration schedule, early exit or auxiliary
  loss weight resumes (was refused), and its log names the change; every such key leaves
  the parameter tree (and so the optimizer state) exactly as it was."""
  def shapes(model):
    spec = config_lib.ModelSpec.from_config(model)
    return jax.tree.map(lambda x: x.shape, nn.unbox(jax.eval_shape(
        lambda: models.init_params(spec))))
  for routing, changes in ((False, LOOP_CHANGES), (True, ROUTING_CHANGES)):
    base = looped_model(routing)
    saved = checkpoint_lib._as_dict(base)
    for key, value in changes.items():
      assert checkpoint_lib.resumable(key), key
      changed = looped_model(routing, **{key: value})
      assert checkpoint_lib.model_differences(saved, changed) == [], key
      assert shapes(changed) == shapes(base), key
  saved = checkpoint_lib._as_dict(looped_model())
  changed = looped_model(**{"loop.mean_iterations": 2, "loop.train_iterations": "uniform"})
  assert checkpoint_lib.resumable_changes(saved, changed) == [
      "model.loop.train_iterations: checkpoint 'fixed', config 'uniform'",
      "model.loop.mean_iterations: checkpoint 3, config 2"]
  assert checkpoint_lib.resumable_changes(None, changed) == []
  assert checkpoint_lib.model_differences(saved, looped_model(**{"loop.core": 2})) != []


@pytest.mark.slow
def test_looped_run_resumes_with_other_mean_iterations(tmp_path, data_dir, caplog):
  config = small(data_dir, 2)
  for key, value in {"num_layers": 4, "loop.prelude": 1, "loop.core": 1, "loop.coda": 1,
                     "loop.mean_iterations": 2}.items():
    *section, leaf = key.split(".")
    (config.model[section[0]] if section else config.model)[leaf] = value
  train.train_and_evaluate(config, tmp_path / "wd")
  config.model.loop.update(mean_iterations=1, train_iterations="uniform")
  config.train.num_steps = 4
  with caplog.at_level(logging.WARNING):
    result = train.train_and_evaluate(config, tmp_path / "wd")
  assert result["step"] == 4
  assert ("resuming with model settings that change no parameter or optimizer state: "
          "model.loop.train_iterations: checkpoint 'fixed', config 'uniform'; "
          "model.loop.mean_iterations: checkpoint 2, config 1") in caplog.text


def small(data_dir, steps, **model):
  """A decoder LM of a few thousand parameters: 2 steps per checkpoint, log every step."""
  config = default.get_config("tied")
  configure(config.model, **{**dict(d_model=16, num_heads=2, d_ff=32, num_layers=2, max_len=16),
                              **model})
  config.data.update(name="algorithmic", task="copy", train_max_len=4, test_max_len=6,
                     num_train_examples=256, num_eval_examples=16, data_dir=str(data_dir),
                     seq_len=16, eval_batches=1)
  config.train.update(num_steps=steps, decay_steps=8, batch_size=8, warmup_steps=1,
                      log_every_steps=1, eval_every_steps=100, checkpoint_every_steps=2,
                      keep_checkpoints=10, async_checkpoints=False)
  return config


def converted(config, workdir):
  """A step-0 checkpoint as launch.convert writes it (interop.write_checkpoint): its
  metadata holds the config, like a trained one's."""
  params = nn.unbox(models.init_params(config_lib.validate(config), seed=3))
  interop.write_checkpoint(config, jax.tree.map(np.asarray, params), workdir)


@pytest.mark.slow
def test_training_resumes_from_the_step_before_a_damaged_one(tmp_path, data_dir, caplog):
  converted(small(data_dir, 4), tmp_path)
  result = train.train_and_evaluate(small(data_dir, 4), tmp_path)  # resumes the converted 0
  assert [r["step"] for r in result["history"]] == [1, 2, 3, 4]
  bad = truncate_array(tmp_path / "checkpoints" / "4")
  with caplog.at_level(logging.WARNING):
    result = train.train_and_evaluate(small(data_dir, 4), tmp_path)
  assert [r["step"] for r in result["history"]] == [3, 4]  # resumed at step 2
  text = warnings_of(caplog)
  assert "Checkpoint step 4 in" in text and f"{bad} is truncated" in text, text
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", async_save=False)
  assert ckpt.all_steps() == [0, 2, 4]  # step 4 saved again next to the damaged one
  ckpt.close()
  assert len(list((tmp_path / "checkpoints").glob("4.damaged-*"))) == 1


@pytest.mark.slow
def test_another_model_is_refused_then_restarted_on_request(tmp_path, data_dir, caplog):
  converted(small(data_dir, 2), tmp_path)
  other = small(data_dir, 2, num_layers=3, d_ff=64, dropout_rate=0.1)
  with pytest.raises(config_lib.ConfigError) as error:
    train.train_and_evaluate(other, tmp_path)
  message = str(error.value)
  assert "model.num_layers: checkpoint 2, config 3" in message
  assert "model.d_ff: checkpoint 32, config 64" in message
  assert "dropout_rate" not in message  # may change when continuing
  assert "--workdir" in message and "--config.train.on_mismatch=restart" in message
  assert [p.name for p in tmp_path.iterdir() if "checkpoints" in p.name] == ["checkpoints"]

  other.train.on_mismatch = "restart"
  with caplog.at_level(logging.WARNING):
    result = train.train_and_evaluate(other, tmp_path)
  assert [r["step"] for r in result["history"]] == [1, 2]  # started at step 0
  aside = list(tmp_path.glob("checkpoints.mismatch-*"))
  assert len(aside) == 1 and str(aside[0]) in warnings_of(caplog)
  assert sorted(p.name for p in aside[0].iterdir()) == ["0"]  # the old run, kept whole
  other.train.num_steps = 4  # the same command again: these checkpoints match, it resumes
  result = train.train_and_evaluate(other, tmp_path)
  assert [r["step"] for r in result["history"]] == [3, 4]
  assert len(list(tmp_path.glob("checkpoints.mismatch-*"))) == 1


# ------------------------------------------------------- corruption that Orbax accepts

def corrupt_array(step_dir, how):
  """Overwrites 4 KiB (``overwrite``, random bytes) or zeroes 8 KiB (``zero``) in the middle
  of the state's largest array file, as far as the file is long; the size is unchanged, so
  the database's byte ranges all still exist."""
  path = array_file(step_dir)
  data = bytearray(path.read_bytes())
  size = min(4096 if how == "overwrite" else 8192, len(data) // 2)
  lo = len(data) // 2 - size // 2
  data[lo:lo + size] = (np.random.default_rng(0).bytes(size) if how == "overwrite"
                        else bytes(size))
  path.write_bytes(bytes(data))
  return path


@pytest.mark.parametrize("how", ["overwrite", "zero"])
def test_corrupt_array_bytes_fail_their_checksum_and_fall_back(how, tmp_path, caplog):
  save_steps(tmp_path, [2, 4])
  bad = corrupt_array(tmp_path / "4", how)
  with caplog.at_level(logging.WARNING):
    (step, state, data_state, _), steps = resume(tmp_path)
  assert step == 2 and data_state == {"next": 2} and steps == [2]
  np.testing.assert_array_equal(state["w"], np.arange(2000.0) + 2)
  text = warnings_of(caplog)
  assert "Checkpoint step 4" in text and f"{bad} does not match its checksum" in text, text
  assert len(list(tmp_path.glob("4.damaged-*"))) == 1


def test_restored_nan_falls_back_without_checksums(tmp_path, caplog):
  """A checkpoint with no checksum file (written before they existed) whose arrays restore
  with NaN: the finiteness check names the step and the array, and the previous step is
  used (training never saves non-finite values)."""
  save_steps(tmp_path, [2])
  ckpt = checkpoint_lib.Checkpointer(tmp_path, async_save=False)
  ckpt.save(4, {"w": jnp.full(2000, jnp.nan), "b": {"c": jnp.ones((8, 8))}}, {}, {})
  ckpt.close()
  (tmp_path / "4" / checkpoint_lib.CHECKSUMS).unlink(missing_ok=True)
  with caplog.at_level(logging.WARNING):
    (step, _, _, _), steps = resume(tmp_path)
  assert step == 2 and steps == [2]
  text = warnings_of(caplog)
  assert "Checkpoint step 4" in text and "restored with NaN/Inf in w" in text, text


def test_checksums_are_written_with_each_step(tmp_path):
  save_steps(tmp_path, [2])
  ckpt = checkpoint_lib.Checkpointer(tmp_path, async_save=True)
  ckpt.save(4, state_at(4), {}, {})
  ckpt.close()
  for step in (2, 4):
    written = json.loads((tmp_path / str(step) / checkpoint_lib.CHECKSUMS).read_text())
    assert array_file(tmp_path / str(step)).relative_to(tmp_path / str(step)).as_posix() in \
        written["files"]
    assert checkpoint_lib.Checkpointer(tmp_path).verify(step) == []


@pytest.mark.slow
def test_every_reader_falls_back_past_a_corrupt_step(tmp_path, data_dir, caplog):
  """launch.generate (prompts and --eval_split) and the conversion tools read through
  interop.read_checkpoint, launch.summary and configs/workdir.py through the stored config:
  a damaged latest step is reported and the previous one used, and a read-only tool moves
  nothing; training then resumes from the previous step and moves the damaged one aside."""
  config = small(data_dir, 4)
  train.train_and_evaluate(config, tmp_path)
  bad = corrupt_array(tmp_path / "checkpoints" / "4", "zero")
  with caplog.at_level(logging.WARNING):
    _, params, step = interop.read_checkpoint(tmp_path)
  assert step == 2
  text = warnings_of(caplog)
  assert "Checkpoint step 4" in text and f"{bad} does not match its checksum" in text, text
  assert "using step 2" in text, text
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]
  with pytest.raises(checkpoint_lib.CheckpointError, match="step 4: .* does not match"):
    interop.read_checkpoint(tmp_path, step=4)
  (tmp_path / "checkpoints" / "4" / "metadata" / "metadata").write_text("{")
  from configs import workdir as workdir_config
  with caplog.at_level(logging.WARNING):
    assert workdir_config.get_config(str(tmp_path)).train.num_steps == 4  # step 2's config
  result = train.train_and_evaluate(config, tmp_path)  # training moves step 4 aside
  assert [r["step"] for r in result["history"]] == [3, 4]
  assert len(list((tmp_path / "checkpoints").glob("4.damaged-*"))) == 1
