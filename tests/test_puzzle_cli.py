"""launch.puzzle on a tiny trained 4x4 Sudoku TRM: grids, verdicts, halting steps and the
accuracy-vs-steps table (test-time steps beyond training's included)."""

import re
import sys

import pytest

from xlps import config as config_lib
from xlps import train

from helpers import run_command

# launch.puzzle runs in processes of its own: importing it here would define its absl flags
# (--workdir, ...) in this pytest worker, where launch.train's are defined too.


def _tiny_sudoku_run(workdir, data_dir):
  c = config_lib.base_config()
  m = c.model
  m.update(dict(family="puzzle", vocab_size=6, d_model=32, num_heads=2, d_ff=64, max_len=16,
                norm_position="post", norm="rmsnorm", tie_embeddings=False, num_layers=4))
  m.recursion.update(dict(net_layers=2, latent_steps=1, cycles=1, supervision_steps=2))
  c.data.update(dict(name="sudoku", tokenizer="none", puzzle_size=4, puzzle_givens=8,
                     seq_len=16, num_train_examples=16, num_eval_examples=8,
                     data_dir=str(data_dir), eval_batches=0))
  c.train.update(dict(batch_size=8, num_steps=4, decay_steps=4, warmup_steps=1,
                      log_every_steps=2, eval_every_steps=4, checkpoint_every_steps=4,
                      ema_decay=0.9))
  train.train_and_evaluate(c, workdir)


@pytest.mark.slow
def test_puzzle_cli_shows_grids_verdicts_and_accuracy_by_step(tmp_path):
  workdir = tmp_path / "run"
  _tiny_sudoku_run(workdir, tmp_path / "data")
  proc = run_command([sys.executable, "-m", "launch.puzzle", f"--workdir={workdir}", "--num=2",
                      "--index=1", "--steps=3", "--eval_examples=0", "--batch_size=4"])
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  assert "step 4, sudoku 4x4, EMA params" in out and "3 test-time steps (eval default 2)" in out
  verdicts = re.findall(r"--- test example (\d+) \(id \d+\): (RIGHT|WRONG)", out)
  assert [int(i) for i, _ in verdicts] == [1, 2]
  assert len(re.findall(r"halting head (?:halted at step \d|did not halt in 3 steps)", out)) == 2
  assert out.count("puzzle    ") == 2 and out.count("model answer (* = wrong)") == 2
  # 4x4 grids: 2x2 boxes, blanks '.', digits 1..4, a band separator between row 2 and 3
  grid_rows = re.findall(r"^([1-4.][ *] [1-4.][ *] \| [1-4.][ *] [1-4.][ *]?)", out, re.M)
  assert len(grid_rows) == 2 * 4 and any("." in row for row in grid_rows)
  assert re.search(r"^------\+------", out, re.M)
  steps = re.findall(r"^step +(\d): exact (\d\.\d{4}) \((\d)/8\), cells (\d\.\d{4})(.*)$", out,
                     re.M)
  assert [int(s[0]) for s in steps] == [1, 2, 3]
  assert "beyond training" in steps[2][4] and "beyond" not in steps[1][4]
  assert "over 8 test examples" in out and "with halting" in out


def test_puzzle_cli_rendering():
  check = """
from launch import puzzle
assert puzzle.grid_lines([1, 2, 3, 4] * 4, "sudoku", 4, [0, 1] + [0] * 14)[:3] == [
    ".  1* | 2  3", ".  1  | 2  3", "------+------"]
assert puzzle.grid_lines([1, 2, 3, 4, 5] * 5, "maze", 5)[0] == "#   S G o"
assert puzzle.cell_text(0, "sudoku") == "?" and puzzle.cell_text(12, "arc") == "?"
"""
  proc = run_command([sys.executable, "-c", check])
  assert proc.returncode == 0, proc.stderr[-3000:]
