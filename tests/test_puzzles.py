"""Puzzle data (xlps.data.puzzles): generators against independent checkers, augmentation,
the public-file loaders and their errors, the TFDS builders and the PuzzlePipeline."""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np
import pytest

from xlps import config as config_lib
from xlps import families
from xlps import data as data_lib
from xlps.config.checks import ConfigError
from xlps.data import builders, puzzles

HERE = os.path.join(os.path.dirname(__file__), "data", "puzzles")
GIVENS = {4: 6, 6: 12, 9: 30}


# ---------------------------------------------------------------------------------- Sudoku


@pytest.mark.parametrize("size", [4, 6, 9])
def test_generated_sudokus_are_valid_unique_and_have_the_givens(size):
  rng = np.random.default_rng(size)
  for _ in range(5):
    puzzle, solution, backtracks = puzzles.generate_sudoku(size, GIVENS[size], rng)
    assert puzzles.check_sudoku(puzzle, solution, size) is None
    assert int((puzzle > 0).sum()) == GIVENS[size]
    solutions, bt = puzzles.solve_sudoku(puzzle, limit=2)
    assert len(solutions) == 1 and (solutions[0] == solution).all()
    assert bt == backtracks >= 0


def test_generation_is_deterministic_and_min_backtracks_holds():
  a = puzzles.generate_sudoku(9, 26, np.random.default_rng(3), min_backtracks=5)
  b = puzzles.generate_sudoku(9, 26, np.random.default_rng(3), min_backtracks=5)
  assert all(np.array_equal(x, y) for x, y in zip(a[:2], b[:2])) and a[2] == b[2] >= 5
  minimal, _, _ = puzzles.generate_sudoku(4, 0, np.random.default_rng(1))
  assert int((minimal > 0).sum()) < 8  # givens=0: as few as uniqueness allows
  with pytest.raises(ValueError, match="givens"):
    puzzles.generate_sudoku(4, 2, np.random.default_rng(0), max_tries=3)  # below the minimum


def test_solver_counts_solutions_and_checker_finds_problems():
  empty = np.zeros((4, 4), np.int64)
  assert len(puzzles.solve_sudoku(empty, limit=5)[0]) == 5
  clash = empty.copy()
  clash[0, :2] = 1
  assert puzzles.solve_sudoku(clash)[0] == []
  puzzle, solution, _ = puzzles.generate_sudoku(6, 12, np.random.default_rng(0))
  bad = solution.copy()
  bad[0, [0, 1]] = bad[0, [1, 0]]  # rows stay permutations, columns break
  assert "column" in puzzles.check_sudoku(puzzle * 0, bad, 6)
  wrong_given = puzzle.copy()
  r, c = np.argwhere(puzzle > 0)[0]
  wrong_given[r, c] = wrong_given[r, c] % 6 + 1
  assert "the puzzle gives" in puzzles.check_sudoku(wrong_given, solution, 6)
  assert "not a permutation" in puzzles.check_sudoku(puzzle, np.ones((6, 6), int), 6)


@pytest.mark.parametrize("size", [4, 6, 9])
def test_sudoku_augmentation_keeps_validity_and_permutes(size):
  puzzle, solution, _ = puzzles.generate_sudoku(size, GIVENS[size], np.random.default_rng(0))
  inputs, labels = puzzles.sudoku_tokens(puzzle), puzzles.sudoku_tokens(solution)
  changed = 0
  for seed in range(20):
    a_in, a_lab = puzzles.augment_sudoku(inputs, labels, size, np.random.default_rng(seed))
    p, s = puzzles.sudoku_digits(a_in, size), puzzles.sudoku_digits(a_lab, size)
    assert puzzles.check_sudoku(p, s, size) is None
    assert (a_in == puzzles.SUDOKU_BLANK).sum() == (inputs == puzzles.SUDOKU_BLANK).sum()
    assert len(puzzles.solve_sudoku(p, limit=2)[0]) == 1
    changed += not np.array_equal(a_lab, labels)
  assert changed >= 18
  again = puzzles.augment_sudoku(inputs, labels, size, np.random.default_rng(5))
  first = puzzles.augment_sudoku(inputs, labels, size, np.random.default_rng(5))
  assert all(np.array_equal(x, y) for x, y in zip(again, first))


# ---------------------------------------------------------------------------------- mazes


@pytest.mark.parametrize("n", [5, 9, 12, 30])
def test_generated_mazes_pass_the_checker(n):
  rng = np.random.default_rng(n)
  for _ in range(3):
    inputs, labels = puzzles.generate_maze(n, rng)
    assert inputs.shape == labels.shape == (n * n,) and inputs.dtype == np.uint8
    assert puzzles.check_maze(inputs, labels) is None
    assert set(np.unique(inputs)) <= {1, 2, 3, 4} and (labels == puzzles.MAZE_PATH).any()
  a = puzzles.generate_maze(n, np.random.default_rng(1))
  b = puzzles.generate_maze(n, np.random.default_rng(1))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_maze_checker_rejects_bad_paths():
  inputs, labels = puzzles.generate_maze(11, np.random.default_rng(2))
  assert "broken" in puzzles.check_maze(inputs, np.where(labels == 5, 2, labels))
  broken = labels.copy()
  broken[np.flatnonzero(labels == 5)[0]] = 2
  assert puzzles.check_maze(inputs, broken) is not None
  longer = labels.copy()
  extra = [i for i in np.flatnonzero(inputs == 2) if labels[i] == 2]
  longer[extra[0]] = 5
  assert puzzles.check_maze(inputs, longer) is not None
  assert "start" in puzzles.check_maze(np.where(inputs == 3, 2, inputs), labels)


# ---------------------------------------------------------------------------------- ARC


def test_arc_dihedral_transforms_are_distinct_and_invertible():
  grid = np.arange(6, dtype=np.uint8).reshape(2, 3)
  outs = [puzzles.dihedral(grid, k) for k in range(8)]
  assert len({(o.shape, o.tobytes()) for o in outs}) == 8
  for k, out in enumerate(outs):
    assert np.array_equal(puzzles.dihedral(out, puzzles.DIHEDRAL_INVERSE[k]), grid)


def test_arc_tokens_round_trip_and_augmentation_is_consistent():
  inp = np.array([[0, 1, 2], [3, 4, 5]], np.uint8)
  out = np.array([[5, 4], [3, 2], [1, 0], [9, 9]], np.uint8)
  tokens = puzzles.arc_tokens(inp)
  assert tokens.shape == (900,) and np.array_equal(puzzles.arc_grid(tokens), inp)
  canvas = tokens.reshape(30, 30)
  assert (canvas[2, :3] == 1).all() and (canvas[:2, 3] == 1).all() and canvas[2, 3] == 0
  full = np.full((30, 30), 7, np.uint8)
  assert np.array_equal(puzzles.arc_grid(puzzles.arc_tokens(full)), full)
  shapes = set()
  for seed in range(10):
    a, b = puzzles.augment_arc(puzzles.arc_tokens(inp), puzzles.arc_tokens(out),
                               np.random.default_rng(seed))
    rng = np.random.default_rng(seed)  # the draws augment_arc makes: transform, then colours
    k = int(rng.integers(8))
    colours = np.concatenate([[0], rng.permutation(9) + 1])
    assert np.array_equal(puzzles.arc_grid(a), puzzles.dihedral(colours[inp], k))
    assert np.array_equal(puzzles.arc_grid(b), puzzles.dihedral(colours[out], k))
    back = puzzles.dihedral(puzzles.arc_grid(b), puzzles.DIHEDRAL_INVERSE[k])
    assert np.array_equal(np.argsort(colours)[back], out)  # invertible, 0 stays 0
    shapes.add(puzzles.arc_grid(a).shape)
  assert len(shapes) == 2


# ---------------------------------------------------------------------------------- loaders


def test_loaders_read_the_shipped_files():
  inputs, labels = puzzles.load_sudoku_csv(os.path.join(HERE, "sudoku", "train.csv"))
  assert inputs.shape == labels.shape == (3, 81) and inputs.dtype == np.uint8
  assert inputs.min() == 1 and labels.min() == 2 and labels.max() == 10
  for i, l in zip(inputs, labels):
    assert puzzles.check_sudoku(i - 1, l - 1, 9) is None
  inputs, labels = puzzles.load_maze_csv(os.path.join(HERE, "maze", "train.csv"))
  assert inputs.shape == (2, 81) and all(puzzles.check_maze(i, l) is None
                                         for i, l in zip(inputs, labels))
  arc = puzzles.load_arc_dir(os.path.join(HERE, "arc"))
  # train: the training task's 2 + 1 pairs and the evaluation task's train pair; test: 1
  assert arc["train"][0].shape == (4, 900) and arc["test"][0].shape == (1, 900)
  assert np.array_equal(puzzles.arc_grid(arc["test"][1][0]), [[0, 2, 0, 2]])


def _write(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def test_bad_files_name_the_file_and_the_row(tmp_path):
  good = open(os.path.join(HERE, "sudoku", "train.csv")).read().splitlines()
  _, q, a, r = good[1].split(",")
  cases = {
      "short.csv": (f"x,{q[:-1]},{a},{r}", "row 2: the question has 80 characters"),
      "char.csv": (f"x,{q[:-1]}x,{a},{r}", "row 2: the question has the character 'x'"),
      "unsolved.csv": (f"x,{q},{a[1:] + a[0]},{r}", "row 2: .*not a permutation of 1..9"),
      "givens.csv": (f"x,{a[:-1] + ('1' if a[-1] != '1' else '2')},{a},{r}",
                     "row 2: the solution has"),
  }
  for name, (row, message) in cases.items():
    path = _write(tmp_path, name, "\n".join([good[0], row, good[2]]))
    with pytest.raises(ValueError, match=f"{name}: {message}"):
      puzzles.load_sudoku_csv(path)
  maze = open(os.path.join(HERE, "maze", "train.csv")).read().splitlines()
  _, mq, ma, mr = maze[2].split(",")
  path = _write(tmp_path, "maze.csv", "\n".join([maze[0], maze[1], f"x,{mq},{ma.replace('o', ' ', 1)},1"]))
  with pytest.raises(ValueError, match="maze.csv: row 3: the path is broken"):
    puzzles.load_maze_csv(path)
  path = _write(tmp_path, "maze2.csv", "\n".join([maze[0], f"x,{mq[:-1]}X,{ma},1"]))
  with pytest.raises(ValueError, match="maze2.csv: row 2: the question's character 'X'"):
    puzzles.load_maze_csv(path)
  task = tmp_path / "arc" / "training"
  shutil.copytree(os.path.join(HERE, "arc"), tmp_path / "arc")
  (task / "ragged.json").write_text('{"train": [{"input": [[1, 2], [3]], "output": [[1]]}],'
                                    ' "test": []}')
  with pytest.raises(ValueError, match="ragged.json: train pair 0 input is not rectangular"):
    puzzles.load_arc_dir(str(tmp_path / "arc"))
  (task / "ragged.json").write_text('{"train": [], "test": [{"input": [[1]], "output": [[10]]}]}')
  with pytest.raises(ValueError, match="ragged.json: test pair 0 output has a cell"):
    puzzles.load_arc_dir(str(tmp_path / "arc"))


# ---------------------------------------------------------------------------------- builders


def test_builders_store_the_generator_output(tmp_path):
  for cls, config, records in (
      (builders.XlpsSudoku, builders.SudokuConfig.make(4, 6, 0, 64, 32),
       puzzles.sudoku_dataset(4, 6, 0, 64, 32, builders._PUZZLE_SEED)),
      (builders.XlpsSudoku, builders.SudokuConfig.make(6, 12, 0, 32, 8),
       puzzles.sudoku_dataset(6, 12, 0, 32, 8, builders._PUZZLE_SEED)),
      (builders.XlpsMaze, builders.MazeConfig.make(9, 32, 8),
       puzzles.maze_dataset(9, 32, 8, builders._PUZZLE_SEED))):
    builder = builders.prepare(cls, config, str(tmp_path))
    for split, expected in records.items():
      stored = builder.as_data_source(split=split)
      assert len(stored) == len(expected)
      by_id = {int(r["id"]): r for r in stored}  # TFDS stores records in its own key order
      for i, want in enumerate(expected):
        got = by_id[i]
        assert want["id"] == i
        for key in want:
          assert np.array_equal(got[key], want[key]), (split, i, key)
    train = {r["labels"].tobytes() for r in records["train"]}
    assert not any(r["labels"].tobytes() in train for r in records["test"]) or cls is builders.XlpsMaze
    if cls is builders.XlpsMaze:
      train = {r["inputs"].tobytes() for r in records["train"]}
      assert not any(r["inputs"].tobytes() in train for r in records["test"])


# ---------------------------------------------------------------------------------- pipeline


@pytest.fixture
def puzzle_family(monkeypatch):
  """A family of layout "puzzle" (whether or not xlps.families has one yet)."""
  name = next((n for n, f in families.FAMILIES.items() if f.layout == "puzzle"), None)
  if name is None:
    name = "puzzle_test"
    monkeypatch.setitem(families.FAMILIES, name,
                        dataclasses.replace(families.FAMILIES["decoder_lm"], layout="puzzle"))
  return name


def _config(family, tmp_path, **data):
  c = config_lib.base_config()
  c.model.family = family
  c.train.batch_size = 8
  c.data.update(dict(name="sudoku", tokenizer="none", puzzle_size=4, puzzle_givens=6, seq_len=16,
                     num_train_examples=64, num_eval_examples=20, data_dir=str(tmp_path),
                     eval_batches=0), **data)
  return c


def test_pipeline_batches_resume_and_eval(puzzle_family, tmp_path):
  config = _config(puzzle_family, tmp_path, augment=True)
  pipeline = data_lib.build(config)
  assert isinstance(pipeline, data_lib.PuzzlePipeline)
  assert pipeline.vocab_size == 6 and pipeline.tokenizer is None
  assert pipeline.eval_splits == ("test",) and "sudoku 4x4" in pipeline.describe()
  it = pipeline.train_iter()
  batch = next(it)
  assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
      "inputs": (np.int32, (8, 16)), "targets": (np.int32, (8, 16)),
      "weights": (np.float32, (8, 16))}
  assert (batch["weights"] == 1).all()
  for i, t in zip(batch["inputs"], batch["targets"]):  # augmented, still valid
    assert puzzles.check_sudoku(puzzles.sudoku_digits(i, 4), puzzles.sudoku_digits(t, 4), 4) is None
  for _ in range(9):  # past an epoch (64 / 8 batches)
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(3)]
  resumed = pipeline.train_iter()
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    assert all(np.array_equal(got[k], want[k]) for k in want)
  evals = list(pipeline.eval_batches("test"))
  again = list(pipeline.eval_batches("test"))
  assert len(evals) == 3 and all(np.array_equal(a[k], b[k]) for a, b in zip(evals, again)
                                 for k in a)
  assert sum(b["weights"].sum() for b in evals) == 20 * 16  # every test cell once
  assert pipeline.padding_batch("test")["weights"].sum() == 0
  # two processes: each its half of every batch
  halves = [data_lib.build(config, process_index=i, process_count=2) for i in range(2)]
  firsts = [next(p.eval_batches("test")) for p in halves]
  assert np.array_equal(np.concatenate([f["inputs"] for f in firsts]), evals[0]["inputs"])


def test_pipelines_from_files_and_mazes(puzzle_family, tmp_path):
  arc = data_lib.build(_config(puzzle_family, tmp_path, name="puzzle_files", puzzle_format="arc",
                               puzzle_dir=os.path.join(HERE, "arc"), seq_len=900, augment=True,
                               num_shards=0))
  batch = next(arc.train_iter())
  assert batch["inputs"].shape == (8, 900) and arc.vocab_size == 12
  assert np.array_equal(batch["weights"], (batch["targets"] != 0).astype(np.float32))
  sudoku = data_lib.build(_config(puzzle_family, tmp_path, name="puzzle_files", puzzle_size=9,
                                  seq_len=81, puzzle_dir=os.path.join(HERE, "sudoku"),
                                  puzzle_subsample=2))
  assert len(sudoku._splits.train) == 2 and next(sudoku.eval_batches("test"))["inputs"].shape == (
      8, 81)
  maze = data_lib.build(_config(puzzle_family, tmp_path, name="maze", puzzle_size=9, seq_len=81,
                                num_train_examples=16, num_eval_examples=4))
  batch = next(maze.train_iter())
  assert maze.vocab_size == 6 and all(puzzles.check_maze(i, t) is None
                                      for i, t in zip(batch["inputs"], batch["targets"]))


@pytest.mark.parametrize("data, match", [
    (dict(seq_len=81), "data.seq_len=81 does not match data.name='sudoku': a 4x4 Sudoku is 16 "
                       "tokens; valid: data.seq_len=16"),
    (dict(puzzle_size=5, seq_len=25), "data.puzzle_size=5 is not valid; choose one of: 4, 6, 9"),
    (dict(tokenizer="byte"), "data.tokenizer='byte' does not apply.*valid: data.tokenizer='none'"),
    (dict(puzzle_givens=17), "data.puzzle_givens=17 exceeds the 16 cells"),
    (dict(puzzle_givens=-1), "data.puzzle_givens=-1 must be an integer >= 0"),
    (dict(name="maze", augment=True, puzzle_size=9, seq_len=81),
     "data.augment=True: mazes have no augmentation"),
    (dict(name="maze", puzzle_size=3, seq_len=9), "data.puzzle_size=3 must be an integer >= 5"),
    (dict(name="puzzle_files", puzzle_format="csv"), "data.puzzle_format='csv' is not valid"),
    (dict(name="puzzle_files"), "data.puzzle_dir='' is empty"),
    (dict(name="puzzle_files", puzzle_dir="/nonexistent/x"), "data.puzzle_dir='/nonexistent/x' "
                                                             "is not a directory"),
    (dict(name="puzzle_files", puzzle_size=9, seq_len=81, puzzle_dir=os.path.join(HERE, "maze")),
     r"data.puzzle_dir=.*maze.*train.csv: row 2: the question has the character '#'"),
    (dict(puzzle_givens=2, num_train_examples=1, num_eval_examples=1),
     "data.puzzle_givens=2 .*no 4x4 Sudoku with 2 givens"),
])
def test_config_errors_name_the_field(puzzle_family, tmp_path, data, match):
  with pytest.raises(ConfigError, match=match):
    data_lib.build(_config(puzzle_family, tmp_path, **data))


def test_puzzle_data_needs_the_puzzle_layout_and_none_tokenizer_needs_puzzles(tmp_path):
  config = _config("decoder_lm", tmp_path)
  with pytest.raises(ConfigError, match="model.family='decoder_lm' does not fit "
                                        "data.name='sudoku'"):
    data_lib.build(config)
  config = config_lib.base_config()
  config.data.tokenizer = "none"
  with pytest.raises(ConfigError, match="data.tokenizer='none' is for puzzle data"):
    config_lib.check_data(config)
  assert data_lib.configured_tokenizer(_config("decoder_lm", tmp_path)) is None
  data_lib.keep_tokenizer(None, tmp_path)  # nothing kept
  assert not (tmp_path / "tokenizer").exists()


@pytest.mark.slow
def test_nine_by_nine_generation_speed():
  import time
  start = time.perf_counter()
  records = puzzles.sudoku_dataset(9, 30, 0, 300, 30, 0)
  assert len(records["test"]) == 30 and time.perf_counter() - start < 30
