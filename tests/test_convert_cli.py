"""A converted HF workdir trains with the exact command ``launch.convert`` prints."""

import json
import os
import shlex
import subprocess
import sys

import jax.numpy as jnp
import pytest
import torch
import transformers
from absl import flags
from ml_collections import config_flags

from configs import albert
from configs import workdir as workdir_config
from xlps import checkpoint as checkpoint_lib

from helpers import HF_ALBERT, ROOT, albert_spiece, logged_losses, run_command


def run_module(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, not the 8 fake ones conftest sets up
  return run_command([sys.executable, "-m", *args], env=env)


def parse_config_flag(*args: str):
  """The config ``launch.train`` would get from ``args`` (config_flags' real parser)."""
  argv = ["prog", *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_workdir_config_round_trips_with_typed_overrides(tmp_path):
  config = albert.get_config("base")
  config.model.sharing.mlp.num_unique = 12
  config.mesh.rules = (("heads", None),)
  (tmp_path / "config.json").write_text(config.to_json_best_effort())
  loaded = parse_config_flag(f"--config={ROOT / 'configs' / 'workdir.py'}:{tmp_path}",
                             "--config.model.sharing.attention.num_unique=3",
                             "--config.train.num_steps=7")
  assert loaded.model.sharing.attention.num_unique == 3  # a placeholder(int), None when saved
  assert loaded.train.num_steps == 7
  loaded.model.sharing.attention.num_unique, loaded.train.num_steps = None, 10000
  assert loaded.to_json() == config.to_json()
  with pytest.raises(TypeError, match="cannot be casted"):
    loaded.model.sharing.norms.num_unique = "two"  # still typed after the round trip


def test_workdir_config_falls_back_to_the_latest_checkpoint(tmp_path):
  config = albert.get_config("bert_base")
  ckpt = checkpoint_lib.Checkpointer(tmp_path / "checkpoints", async_save=False)
  try:
    for step, num_steps in ((1, 11), (2, 22)):
      config.train.num_steps = num_steps
      ckpt.save(step, {"x": jnp.zeros(2)}, {}, {"config": json.loads(config.to_json())})
  finally:
    ckpt.close()
  assert workdir_config.get_config(str(tmp_path)).to_json() == config.to_json()
  (tmp_path / "config.json").write_text(albert.get_config("base").to_json())  # preferred
  assert workdir_config.get_config(str(tmp_path)).model.vocab_size == 30000


@pytest.mark.parametrize("saved, error", [
    (None, r"has neither config.json nor a checkpoint in .*; pass a workdir written by "
           r"`python -m launch.convert"),
    ({"model": {"num_layerz": 3}}, r"saved config key model.num_layerz is not an xlps config "
                                   r"key; valid keys here: .*num_layers"),
    ({"train": {"num_steps": "many"}}, r"saved config key train.num_steps='many'"),
    ({"model": 3}, r"saved config key model=3 must be a section"),
])
def test_workdir_config_errors_name_the_problem(tmp_path, saved, error):
  if saved is not None:
    (tmp_path / "config.json").write_text(json.dumps(saved))
  with pytest.raises(ValueError, match=error):
    workdir_config.get_config(str(tmp_path))


def test_workdir_config_needs_an_existing_workdir(tmp_path):
  with pytest.raises(ValueError, match="needs the workdir as its argument"):
    workdir_config.get_config()
  missing = tmp_path / "missing"
  with pytest.raises(ValueError, match=f"workdir '{missing}' has neither"):
    workdir_config.get_config(str(missing))
  assert not missing.exists()  # reading creates nothing


@pytest.mark.slow
def test_converted_workdir_trains_with_the_printed_command(tmp_path, data_dir):
  torch.manual_seed(0)
  hf_model = transformers.AlbertForMaskedLM(transformers.AlbertConfig(
      **{**HF_ALBERT, "max_position_embeddings": 128}))
  hf_model.save_pretrained(tmp_path / "hf")
  spiece = albert_spiece(tmp_path / "hf" / "spiece.model")  # the snapshot's own tokenizer
  workdir = tmp_path / "wd"
  out = run_module("launch.convert", f"--hf={tmp_path / 'hf'}", f"--workdir={workdir}")
  assert out.returncode == 0, out.stderr[-4000:]
  printed = out.stdout
  assert (workdir / "tokenizer" / "spiece.model").read_bytes() == spiece
  command = f"python -m launch.train --config=configs/workdir.py:{workdir} --workdir={workdir}"

  out = run_module(*shlex.split(command)[2:], f"--config.data.data_dir={data_dir}",
                   "--config.data.seq_len=32", "--config.data.eval_batches=1",
                   "--config.model.sharing.mlp.num_unique=1",  # a placeholder(int) field
                   "--config.train.num_steps=2", "--config.train.batch_size=8",
                   "--config.train.warmup_steps=1", "--config.train.log_every_steps=1",
                   "--config.train.eval_every_steps=2", "--config.train.checkpoint_every_steps=2")
  assert out.returncode == 0, out.stderr[-4000:]
  assert command in printed, printed  # the command above, word for word
  assert "Resumed from" in out.stderr and "at step 0" in out.stderr
  assert sorted(logged_losses(workdir)) == [1, 2]
  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", async_save=False)
  try:
    assert ckpt.all_steps() == [0, 2]
  finally:
    ckpt.close()

  # Back to HF: the run's tokenizer (kept in the workdir) and its ids go with the weights.
  out = run_module("launch.convert", f"--workdir={workdir}", f"--hf_out={tmp_path / 'out'}")
  assert out.returncode == 0, out.stderr[-4000:]
  assert (tmp_path / "out" / "spiece.model").read_bytes() == spiece
  hf_config = json.loads((tmp_path / "out" / "config.json").read_text())
  assert [hf_config[f"{k}_token_id"] for k in ("pad", "bos", "eos")] == [0, 2, 3]


@pytest.mark.slow
def test_convert_and_recursify_bad_paths_are_one_line(tmp_path):
  """issue 23 item 7: a missing --hf, a non-empty --workdir and a missing --from were
  tracebacks (transformers' 'Repo id must be ...' OSError, write_checkpoint's ValueError)."""
  transformers.AlbertForMaskedLM(transformers.AlbertConfig(**HF_ALBERT)).save_pretrained(
      tmp_path / "hf")
  (tmp_path / "used").mkdir()
  (tmp_path / "used" / "metrics.jsonl").write_text("{}\n")

  def error(*args):
    out = run_module(*args)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    return out.stderr.strip()
  assert error("launch.convert", f"--hf={tmp_path / 'nohf'}", f"--workdir={tmp_path / 'a'}") == (
      f"error: --hf='{tmp_path / 'nohf'}' does not exist; valid: a Hugging Face "
      "save_pretrained directory (config.json and the weights)")
  used = (f"error: --workdir='{tmp_path / 'used'}' is not empty (it holds metrics.jsonl); valid: "
          "a new or empty directory to write the converted step-0 checkpoint to")
  assert error("launch.convert", f"--hf={tmp_path / 'hf'}", f"--workdir={tmp_path / 'used'}") == used
  assert error("launch.recursify", f"--from={tmp_path / 'hf'}", f"--workdir={tmp_path / 'used'}",
               "--num_unique=2") == used
  assert error("launch.recursify", f"--from={tmp_path / 'nosrc'}", f"--workdir={tmp_path / 'b'}",
               "--num_unique=2") == (
      f"error: --from='{tmp_path / 'nosrc'}' does not exist; valid: an xlps workdir (its latest "
      "checkpoint) or an HF BERT / ALBERT save_pretrained directory")
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
