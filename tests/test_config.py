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
