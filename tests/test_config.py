"""The config schema: light to import, one error type, caught by the launchers."""

import ast
import sys

import pytest

from xlps import config as config_lib

from helpers import ROOT, launch_train, run_command

# Packages (and their submodules) that the schema and config files never import.
HEAVY = ("jax", "flax", "optax", "orbax", "grain", "tensorflow", "tensorflow_datasets",
         "xlps.train", "xlps.data", "xlps.models")
CONFIG_FILES = sorted(p.stem for p in (ROOT / "configs").glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", ["xlps.config"] + [f"configs.{name}" for name in CONFIG_FILES])
def test_config_files_import_light(module):
  """In a fresh process, ``import xlps.config`` (and each config file) loads none of HEAVY."""
  code = (f"import sys, {module}; heavy = {HEAVY!r}; "
          "print(sorted(m for m in sys.modules "
          "if any(m == h or m.startswith(h + '.') for h in heavy)))")
  out = run_command([sys.executable, "-c", code], timeout=120)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "[]", out.stdout


def test_config_package_imports_in_one_direction():
  """The section modules of ``xlps/config/`` import each other without a cycle, none imports
  the package itself (only ``__init__`` re-exports), and none imports ``xlps.data``."""
  package = ROOT / "xlps" / "config"
  imports = {}
  for path in sorted(package.glob("*.py")):
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
      if isinstance(node, ast.ImportFrom):  # relative imports are inside xlps.config
        module = ".".join(filter(None, ["xlps.config" if node.level else "", node.module]))
        names.add(module)
        if module in ("xlps", "xlps.config"):  # from xlps import data / from . import checks
          names.update(f"{module}.{alias.name}" for alias in node.names)
      elif isinstance(node, ast.Import):
        names.update(alias.name for alias in node.names)
    imports[path.stem] = {n.split(".")[2] for n in names if n.startswith("xlps.config.")}
    assert not any(n == "xlps.data" or n.startswith("xlps.data.") for n in names), path.name
    if path.stem != "__init__":
      assert "xlps.config" not in names, f"{path.name} imports the package (a cycle via __init__)"
  del imports["__init__"]
  done: list[str] = []
  while len(done) < len(imports):  # peel modules whose imports are all peeled
    ready = sorted(m for m, deps in imports.items() if m not in done and deps <= set(done))
    assert ready, f"import cycle among {sorted(set(imports) - set(done))}: {imports}"
    done += ready


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
