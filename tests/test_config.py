"""The config schema: light to import, one error type, caught by the launchers."""

import sys

import pytest

from xlps import config as config_lib

from helpers import ROOT, launch_train, run_command

HEAVY = ("orbax", "grain", "tensorflow_datasets", "xlps.train", "xlps.data")
CONFIG_FILES = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("name", CONFIG_FILES)
def test_config_files_import_light(name):
  code = (f"import sys, configs.{name}; "
          f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r} or m in {HEAVY!r}))")
  out = run_command([sys.executable, "-c", code], timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]", out.stdout


def test_every_section_has_one_schema():
  config = config_lib.base_config()
  assert set(config) == {"seed", "model", "data", "train", "mesh"}
  with pytest.raises(config_lib.ConfigError, match="train.num_step is not a train key"):
    bad = config_lib.base_config()
    bad.train.num_step = 3
    config_lib.validate(bad, num_devices=1)
  with pytest.raises(config_lib.ConfigError, match="optimizer is not a config section"):
    bad = config_lib.base_config()
    bad.optimizer = {}
    config_lib.validate(bad, num_devices=1)
  assert config_lib.validate(config, num_devices=1).family == "decoder_lm"


@pytest.mark.parametrize("flag,message", [
    ("--config.model.num_heads=7", "error: model.num_heads=7 does not divide model.d_model=64"),
    ("--config.data.seq_len=4096", "error: data.seq_len=4096 exceeds model.max_len=128"),
    ("--config.mesh.data=3", "error: mesh data=3 x fsdp=1 x tensor=1 needs 3 devices"),
    ("--config.model.sharing.order=cycle", None),  # sanity: a valid override still runs
])
def test_launch_train_reports_config_errors_without_traceback(flag, message, tmp_path):
  args = launch_train(tmp_path / "wd", flag)
  if message is None:  # stop right after validation: an unwritable workdir is a ConfigError
    (tmp_path / "wd").write_text("a file, not a folder")
    message = "cannot be written"
  out = run_command(args, timeout=300)
  assert out.returncode == 2, out.stderr[-3000:]
  assert message in out.stderr and "Traceback" not in out.stderr, out.stderr[-3000:]


@pytest.mark.parametrize("variant,shape", [
    ("middle_cycle", {"slots": (0, 1, 2, 1, 2, 1, 2, 3)}),
    ("relaxed", {"slots": (0, 1, 2, 0, 1, 2), "lora": 8}),
    ("mor_expert", {"routing": "expert_choice", "capacity": (1.0, 2 / 3, 1 / 3)}),
    ("mor_token", {"routing": "token_choice"}),
])
def test_recursive_config_variants(variant, shape):
  from configs import recursive
  for arg in (variant, f"{variant},runlocal"):
    spec = config_lib.validate(recursive.get_config(arg), num_devices=1)
    plan = spec.stacks[0].plans["mlp"]
    if "slots" in shape:
      assert plan.slots == shape["slots"]
    if "lora" in shape:
      assert spec.lora.rank == shape["lora"] and spec.lora.bias
    if "routing" in shape:
      assert spec.routing.kind == shape["routing"] and spec.loop.max_iterations == 3
      assert plan.slots == (0, 1, 2, 1, 2, 1, 2, 3)  # middle-cycle as a looped core
    if "capacity" in shape:
      assert spec.routing.capacity == pytest.approx(shape["capacity"])
  with pytest.raises(ValueError, match="variant 'bogus' is unknown"):
    recursive.get_config("bogus")
