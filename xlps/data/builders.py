"""TFDS builders for the datasets that ship with xlps (nothing is downloaded).

* ``XlpsAlgorithmic``: the Universal Transformer paper's algorithmic seq2seq tasks (copy,
  reverse, addition of decimal strings), generated from a fixed seed. Splits: ``train``
  and ``test`` with lengths in [train_min_len, train_max_len] and ``test_long`` with lengths
  in [train_max_len + 1, test_max_len] (length generalisation).
* ``XlpsStdlib``: the ``.py`` files of the running Python's standard library as text (tests,
  ``site-packages`` and non-UTF-8 files excluded), split train/validation by a hash of the
  relative path. Different Python versions ship different files, so the builder config
  is named after the exact Python version and a digest of its file list.

* ``XlpsSudoku`` / ``XlpsMaze``: generated puzzles for recursive-reasoning models
  (``xlps.data.puzzles``: tokens, generators, checkers), splits ``train`` and ``test``
  (disjoint), from a fixed seed; the config name encodes every field.

All are prepared as ``array_record`` (readable without TensorFlow via ``as_data_source``)
on first use by ``prepare``, which holds an exclusive ``fcntl`` lock so that concurrent
processes (pytest-xdist workers, several hosts' local processes) prepare once; TFDS itself
writes into a temporary directory and renames it when complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import os
import pathlib
import platform
import sysconfig
import tempfile
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from xlps.config import TASKS, ConfigError
from xlps.data import puzzles

_ALGORITHMIC_SEED = 20180710  # the Universal Transformer paper's arXiv date
_PUZZLE_SEED = 20250626  # HRM's arXiv date
_STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests",
                                   "idle_test", "__pycache__"})
VALIDATION_PERCENT = 5  # stdlib and text_files: share of files held out for validation


def split_score(relative_path: str) -> int:
  """A stable pseudo-random number in [0, 100) per file path (the by-file split)."""
  digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") % 100


def is_validation_file(relative_path: str) -> bool:
  """Deterministic by-file split (same answer on every machine and Python version)."""
  return split_score(relative_path) < VALIDATION_PERCENT


@dataclasses.dataclass
class AlgorithmicConfig(tfds.core.BuilderConfig):
  """One task and length range; the name encodes every field, so each gets its own cache."""

  task: str = "copy"
  train_min_len: int = 1
  train_max_len: int = 20
  test_max_len: int = 40
  num_train_examples: int = 20000
  num_eval_examples: int = 1000

  @classmethod
  def make(cls, task: str, train_min_len: int, train_max_len: int, test_max_len: int,
           num_train_examples: int, num_eval_examples: int) -> "AlgorithmicConfig":
    name = (f"{task}_len{train_min_len}-{train_max_len}_long{test_max_len}"
            f"_n{num_train_examples}-{num_eval_examples}")
    return cls(name=name, task=task, train_min_len=train_min_len, train_max_len=train_max_len,
               test_max_len=test_max_len, num_train_examples=num_train_examples,
               num_eval_examples=num_eval_examples)


def algorithmic_example(task: str, length: int, rng: np.random.Generator) -> tuple[str, str]:
  """(source, target) of one example of ``length`` digits (addition: the longer operand has
  ``length`` digits, the other 1..``length``, in random order)."""
  def number(n):
    digits = rng.integers(0, 10, n)
    if n > 1:
      digits[0] = rng.integers(1, 10)  # no leading zeros in addition operands
    return "".join(map(str, digits))

  if task == "addition":
    a, b = number(length), number(int(rng.integers(1, length + 1)))
    if rng.integers(2):
      a, b = b, a
    return f"{a}+{b}", str(int(a) + int(b))
  source = "".join(map(str, rng.integers(0, 10, length)))
  return source, source if task == "copy" else source[::-1]


class XlpsAlgorithmic(tfds.core.GeneratorBasedBuilder):
  """Algorithmic seq2seq tasks (copy / reverse / addition); see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Copy, reverse and addition of decimal strings."}
  BUILDER_CONFIGS = [AlgorithmicConfig.make(task, 1, 20, 40, 20000, 1000) for task in TASKS]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "id": np.int64, "source": tfds.features.Text(), "target": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    return {
        "train": self._generate_examples(0, c.num_train_examples, c.train_min_len,
                                         c.train_max_len),
        "test": self._generate_examples(1, c.num_eval_examples, c.train_min_len,
                                        c.train_max_len),
        "test_long": self._generate_examples(2, c.num_eval_examples, c.train_max_len + 1,
                                             c.test_max_len),
    }

  def _generate_examples(self, split_index: int, num: int, min_len: int, max_len: int):
    task = self.builder_config.task
    rng = np.random.default_rng([_ALGORITHMIC_SEED, TASKS.index(task), split_index])
    for i in range(num):
      source, target = algorithmic_example(task, int(rng.integers(min_len, max_len + 1)), rng)
      yield i, {"id": i, "source": source, "target": target}


@dataclasses.dataclass
class SudokuConfig(tfds.core.BuilderConfig):
  """Generated Sudokus of one size and difficulty; the name encodes every field."""

  size: int = 9
  givens: int = 30
  min_backtracks: int = 0
  num_train_examples: int = 20000
  num_eval_examples: int = 1000

  @classmethod
  def make(cls, size: int, givens: int, min_backtracks: int, num_train_examples: int,
           num_eval_examples: int) -> "SudokuConfig":
    name = (f"s{size}_givens{givens}_bt{min_backtracks}"
            f"_n{num_train_examples}-{num_eval_examples}")
    return cls(name=name, size=size, givens=givens, min_backtracks=min_backtracks,
               num_train_examples=num_train_examples, num_eval_examples=num_eval_examples)


class XlpsSudoku(tfds.core.GeneratorBasedBuilder):
  """Generated Sudokus with unique solutions (``puzzles.sudoku_dataset``): uint8 tokens
  ``inputs`` / ``labels`` [size*size], the solver's ``backtracks`` and the ``givens``."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Sudokus 4x4 / 6x6 / 9x9 with unique solutions."}
  BUILDER_CONFIGS = [SudokuConfig.make(9, 30, 0, 20000, 1000)]

  def _info(self) -> tfds.core.DatasetInfo:
    cells = self.builder_config.size ** 2
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "id": np.int64, "inputs": tfds.features.Tensor(shape=(cells,), dtype=np.uint8),
        "labels": tfds.features.Tensor(shape=(cells,), dtype=np.uint8),
        "backtracks": np.int64, "givens": np.int64}))

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    records = puzzles.sudoku_dataset(c.size, c.givens, c.min_backtracks, c.num_train_examples,
                                     c.num_eval_examples, _PUZZLE_SEED)
    return {split: self._generate_examples(rs) for split, rs in records.items()}

  def _generate_examples(self, records: list[dict]):
    for r in records:
      yield r["id"], r


@dataclasses.dataclass
class MazeConfig(tfds.core.BuilderConfig):
  """Generated mazes of one size; the name encodes every field."""

  size: int = 30
  num_train_examples: int = 20000
  num_eval_examples: int = 1000

  @classmethod
  def make(cls, size: int, num_train_examples: int, num_eval_examples: int) -> "MazeConfig":
    return cls(name=f"n{size}_n{num_train_examples}-{num_eval_examples}", size=size,
               num_train_examples=num_train_examples, num_eval_examples=num_eval_examples)


class XlpsMaze(tfds.core.GeneratorBasedBuilder):
  """Generated mazes with a marked shortest path (``puzzles.maze_dataset``): uint8 tokens
  ``inputs`` / ``labels`` [size*size] and the ``path_length`` in steps."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Mazes (DFS spanning tree plus loops), start and goal far apart."}
  BUILDER_CONFIGS = [MazeConfig.make(30, 20000, 1000)]

  def _info(self) -> tfds.core.DatasetInfo:
    cells = self.builder_config.size ** 2
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "id": np.int64, "inputs": tfds.features.Tensor(shape=(cells,), dtype=np.uint8),
        "labels": tfds.features.Tensor(shape=(cells,), dtype=np.uint8),
        "path_length": np.int64}))

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    records = puzzles.maze_dataset(c.size, c.num_train_examples, c.num_eval_examples,
                                   _PUZZLE_SEED)
    return {split: self._generate_examples(rs) for split, rs in records.items()}

  def _generate_examples(self, records: list[dict]):
    for r in records:
      yield r["id"], r


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_files() -> list[str]:
  """Sorted relative paths of the standard library's ``.py`` files that the builder uses."""
  root = stdlib_root()
  paths = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if d not in _STDLIB_EXCLUDED_DIRS]
    rel = pathlib.Path(folder).relative_to(root)
    paths += [(rel / f).as_posix() for f in files if f.endswith(".py")]
  return sorted(paths)


def stdlib_config() -> tfds.core.BuilderConfig:
  """The config of this interpreter's stdlib: named after the Python version and a digest
  of the file list and sizes, so a cache made by another Python is never reused."""
  root, digest = stdlib_root(), hashlib.sha256()
  for rel in stdlib_files():
    digest.update(f"{rel}:{(root / rel).stat().st_size}\n".encode())
  version = platform.python_version()
  return tfds.core.BuilderConfig(name=f"py{version.replace('.', '_')}_{digest.hexdigest()[:8]}",
                                 description=f"Python {version} standard library ({root})")


class XlpsStdlib(tfds.core.GeneratorBasedBuilder):
  """The running Python's standard library sources; see the module docstring."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Standard library .py files, split by a hash of the path."}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "id": np.int64, "path": tfds.features.Text(), "text": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    files = stdlib_files()
    return {
        "train": self._generate_examples([f for f in files if not is_validation_file(f)]),
        "validation": self._generate_examples([f for f in files if is_validation_file(f)]),
    }

  def _generate_examples(self, files: list[str]) -> Iterator[tuple[str, dict]]:
    root = stdlib_root()
    for i, rel in enumerate(files):
      try:
        text = (root / rel).read_bytes().decode("utf-8")
      except UnicodeDecodeError:
        continue  # a handful of versions ship Latin-1 sources; TFDS text must be UTF-8
      if text.strip():
        yield rel, {"id": i, "path": rel, "text": text}


@contextlib.contextmanager
def exclusive_lock(data_dir: str, key: str):
  """An inter-process lock for ``key`` (on the local disk; remote data dirs lock per host)."""
  lock_dir = data_dir if "://" not in data_dir else tempfile.gettempdir()
  os.makedirs(lock_dir, exist_ok=True)
  with open(os.path.join(lock_dir, f".{key}.lock"), "a") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare(builder_cls: type[tfds.core.GeneratorBasedBuilder],
            config: tfds.core.BuilderConfig, data_dir: str) -> tfds.core.GeneratorBasedBuilder:
  """The builder for ``config``, prepared as array_record in ``data_dir`` if it is not yet."""
  key = f"{builder_cls.name}-{config.name}-{builder_cls.VERSION}"
  # TFDS refuses a custom config object named like one of the class's own configs.
  config_arg = config.name if config.name in builder_cls.builder_configs else config

  def make():
    return builder_cls(data_dir=data_dir, config=config_arg, file_format="array_record")

  try:
    with exclusive_lock(data_dir, key):
      # Constructed under the lock: the builder reads the prepared dataset info at init.
      builder = make()
      if not builder.is_prepared():
        tfds.disable_progress_bar()  # a one-second job; its bars would swamp the training log
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(try_download_gcs=False))
        builder = make()
  except OSError as e:
    if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
      raise
    builder = make()  # a read-only data_dir serves a dataset prepared there before
    if builder.is_prepared():
      return builder
    raise ConfigError(f"data.data_dir={data_dir!r} cannot be written ({e.strerror}: "
                      f"{e.filename!r}) and {builder_cls.name} is not prepared there; valid: a "
                      "writable directory for prepared datasets (created if missing), or '' for "
                      "$TFDS_DATA_DIR or ~/tensorflow_datasets") from None
  return builder
