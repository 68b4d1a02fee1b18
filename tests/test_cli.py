"""launch.summary: readable table, and --json prints exactly one JSON object on stdout."""

import json
import sys

from helpers import ROOT, run_command


def run_summary(*args):
  return run_command([sys.executable, "-m", "launch.summary", *args], timeout=300)


def test_summary_json_with_overrides():
  out = run_summary("--config=configs/albert.py:base", "--config.model.num_layers=48",
                    "--config.model.sharing.num_unique=4", "--config.model.sharing.order=cycle",
                    "--json")
  assert out.returncode == 0, out.stderr
  summary = json.loads(out.stdout)  # the whole stdout is one JSON object
  for key in ("unique_params", "applied_params", "flops_per_token", "slots"):
    assert key in summary
  assert set(summary["slots"]) == {"attention", "mlp", "norms"}
  assert summary["slots"]["mlp"] == [i % 4 for i in range(48)]
  assert summary["applied_params"] > summary["unique_params"]


def test_summary_table_and_component_override():
  out = run_summary("--config=configs/albert.py:base", "--config.model.sharing.mlp.num_unique=12")
  assert out.returncode == 0, out.stderr
  assert "attention" in out.stdout and "unique params" in out.stdout
  mlp_row = next(line for line in out.stdout.splitlines() if line.startswith("mlp"))
  assert mlp_row.split()[1] == "12"  # slots column


def test_summary_bad_config_is_a_clear_error():
  out = run_summary("--config=configs/albert.py:base", "--config.model.num_heads=7")
  assert out.returncode != 0
  assert "model.num_heads=7 does not divide model.d_model=768" in out.stderr
  assert "Traceback" not in out.stderr


def test_ci_runs_the_readme_test_command():
  readme = (ROOT / "README.md").read_text()
  ci = (ROOT / ".ci" / "run").read_text()
  command = ci.strip().splitlines()[-1]
  assert command in readme
