"""Random-access record sources per ``data.name``, before tokenization.

Text sources yield records with a text feature (str or bytes: one document each);
seq2seq sources yield ``{"source", "target"}`` byte strings; puzzle sources yield
``{"inputs", "labels"}`` uint8 token arrays (``xlps.data.puzzles``). Every source is a sequence
(``len`` + ``__getitem__``) so grain can shard and shuffle it by index.
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import hashlib
import operator
import os
import platform
from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from xlps.config import ConfigError
from xlps.data import builders, puzzles

_SUBSAMPLE_SEED = 1000  # puzzle_files: the fixed choice of data.puzzle_subsample examples


@dataclasses.dataclass(frozen=True)
class Splits:
  """The train split and the eval splits of one dataset."""

  kind: str                          # "text" | "seq2seq" | "puzzle"
  train: Sequence[Mapping]
  evals: dict[str, Sequence[Mapping]]
  text_key: str                      # text: the feature holding a document
  cache_key: str                     # identifies the train split (tokenizer cache names)
  summary: str                       # for Pipeline.describe()
  # seq2seq: the longest operand length of each split ("train" and the eval splits), so rows
  # are padded to what the split needs, not to data.seq_len
  longest: dict[str, int] = dataclasses.field(default_factory=dict)
  # puzzle: "sudoku" | "maze" | "arc", the Sudoku / maze side, the token vocabulary
  puzzle: str = ""
  puzzle_size: int = 0
  vocab_size: int = 0


class PuzzleArrays(Sequence):
  """Puzzle records ``{"id", "inputs", "labels"}`` over two token arrays [examples, L]."""

  def __init__(self, inputs, labels):
    self._inputs, self._labels = inputs, labels

  def __len__(self) -> int:
    return len(self._inputs)

  def __getitem__(self, index):
    index = operator.index(index)
    if not -len(self) <= index < len(self):
      raise IndexError(f"puzzle record {index} is out of range ({len(self)} records)")
    return {"id": index % len(self), "inputs": self._inputs[index], "labels": self._labels[index]}


class CheckedSource(Sequence):
  """A prepared array_record split whose read failures name the file, the record and the fix.

  A corrupted file (a flipped byte, a truncated copy) otherwise surfaces as a bare Riegeli
  hash error from deep inside grain. ``verify()`` reads, at build time and so before anything
  compiles, every record of a split of up to ``VERIFY_ALL`` records and the first and last
  record of every file of a larger one; a record that fails later, while training, raises
  the same ``CorruptDataError``.
  """

  VERIFY_ALL = 4096

  def __init__(self, source, what: str, fix: str):
    self._source, self._what, self._fix = source, what, fix
    self._files = []  # (first index, end index, filename) of each file's records
    try:
      from tensorflow_datasets.core.data_sources import base
      start = 0
      for fi in base.file_instructions(source.dataset_info, source.split):
        self._files.append((start, start + fi.take, fi.filename))
        start += fi.take
    except Exception:  # not an array_record source (e.g. tfds.testing.mock_data)
      self._files = []

  def __len__(self) -> int:
    return len(self._source)

  def __iter__(self):
    for index in range(len(self)):
      yield self[index]

  def __getitem__(self, index):
    index, size = operator.index(index), len(self._source)
    if not -size <= index < size:
      raise IndexError(f"{self._what}: record {index} is out of range ({size} records)")
    index %= size
    try:
      return self._source[index]
    except Exception as e:
      raise self._error(index, e) from None

  def _error(self, index: int, e: Exception) -> "CorruptDataError":
    where = next((f for lo, hi, f in self._files if lo <= index < hi), "?")
    return CorruptDataError(f"{self._what}: record {index} in file {where!r} cannot be read, the "
                            f"file is corrupted or truncated ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); {self._fix}")

  def verify(self) -> "CheckedSource":
    if not self._files:
      return self
    if len(self) <= self.VERIFY_ALL:
      indices = range(len(self))
    else:
      indices = sorted({i for lo, hi, _ in self._files if hi > lo for i in (lo, hi - 1)})
    read_raw = getattr(getattr(self._source, "data_source", None), "__getitems__", None)
    try:
      if read_raw is not None:  # one batched read of the stored bytes (no decoding) ...
        read_raw(list(indices))
        return self
    except Exception:  # noqa: BLE001 ... and record by record to name the one that fails
      pass
    for index in indices:
      self[index]
    return self


class CorruptDataError(ConfigError):
  """A prepared dataset file that cannot be read back (bad input, like a bad config)."""


def _checked(source, what: str, fix: str) -> CheckedSource:
  return CheckedSource(source, what, fix).verify()


def _rebuild_fix(builder) -> str:
  return (f"delete {os.fspath(builder.data_dir)!r} and run again to prepare it afresh")


def algorithmic(d, data_dir: str) -> Splits:
  """The prepared (on first use) algorithmic task of ``config.data``."""
  config = builders.AlgorithmicConfig.make(
      d.task, d.train_min_len, d.train_max_len, d.test_max_len, d.num_train_examples,
      d.num_eval_examples)
  builder = builders.prepare(builders.XlpsAlgorithmic, config, data_dir)
  read = lambda split: _checked(builder.as_data_source(split=split),  # noqa: E731
                                f"data.name='algorithmic' split {split!r}", _rebuild_fix(builder))
  return Splits(kind="seq2seq", train=read("train"),
                evals={"test": read("test"), "test_long": read("test_long")}, text_key="",
                cache_key=config.name,
                summary=(f"algorithmic/{d.task} (train lengths {d.train_min_len}..{d.train_max_len}"
                         f", test_long {d.train_max_len + 1}..{d.test_max_len})"),
                longest={"train": d.train_max_len, "test": d.train_max_len,
                         "test_long": d.test_max_len})


def stdlib(data_dir: str) -> Splits:
  """The running Python's standard library sources (prepared on first use)."""
  builder = builders.prepare(builders.XlpsStdlib, builders.stdlib_config(), data_dir)
  train, val = (_checked(builder.as_data_source(split=s), f"data.name='stdlib' split {s!r}",
                         _rebuild_fix(builder)) for s in ("train", "validation"))
  return Splits(kind="text", train=train, evals={"validation": val}, text_key="text",
                cache_key=f"stdlib_{builder.builder_config.name}",
                summary=(f"stdlib (Python {platform.python_version()}: {len(train)} train / "
                         f"{len(val)} validation files)"))


def text_files(pattern: str, *, require_utf8: bool) -> Splits:
  """The user's files matching ``pattern``, one document per file, split by file.

  With two or more files, about 5% of them (at least one, chosen by a hash of the path
  relative to the files' common directory) are validation; a single file is split at the
  last newline before 95% of its bytes. Files are read as bytes; ``require_utf8`` (set for
  SentencePiece) rejects a file that is not UTF-8.
  """
  matches = sorted(glob_lib.glob(os.path.expanduser(pattern), recursive=True)) if pattern else []
  paths = [p for p in matches if os.path.isfile(p)]
  if matches and not paths:
    kind = "directory" if os.path.isdir(matches[0]) else "not a regular file"
    raise ConfigError(f"data.glob={pattern!r} matched {len(matches)} path(s) but no files "
                      f"({matches[0]!r} is a {kind}); valid: a glob of files, e.g. "
                      f"{os.path.join(matches[0], '**', '*.txt')!r}")
  if not paths:
    raise ConfigError(f"data.glob={pattern!r} matched no files; give a glob of your text "
                      "files, e.g. '~/corpus/**/*.txt' (with data.name='text_files')")
  texts = {}
  for path in paths:
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      raise ConfigError(f"data.glob={pattern!r}: file {path!r} cannot be read "
                        f"({e.strerror or e}); fix its permissions or narrow the glob") from None
    if not data.strip():
      raise ConfigError(f"data.glob={pattern!r}: file {path!r} is empty; remove it or "
                        "narrow the glob")
    if require_utf8:
      try:
        data.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ConfigError(f"data.glob={pattern!r}: file {path!r} is not UTF-8 ({e}); "
                          "data.tokenizer='sentencepiece' needs UTF-8 text (the 'byte' "
                          "tokenizer accepts any bytes)") from None
    texts[path] = data
  if len(paths) == 1:
    data = texts[paths[0]]
    cut = data.rfind(b"\n", 0, len(data) * 95 // 100) + 1 or max(1, len(data) * 95 // 100)
    train_docs, val_docs = [data[:cut]], [data[cut:]]
  else:
    root = os.path.commonpath(paths)
    rel = {p: os.path.relpath(p, root) for p in paths}
    val_paths = [p for p in paths if builders.is_validation_file(rel[p])]
    if not val_paths or len(val_paths) == len(paths):
      val_paths = [min(paths, key=lambda p: builders.split_score(rel[p]))]
    train_docs = [texts[p] for p in paths if p not in val_paths]
    val_docs = [texts[p] for p in val_paths]
  if not val_docs[0]:
    raise ConfigError(f"data.glob={pattern!r}: the single file {paths[0]!r} is too small "
                      "to split into train and validation")
  records = lambda docs: [{"id": i, "text": doc} for i, doc in enumerate(docs)]  # noqa: E731
  digest = hashlib.sha256()
  for path in paths:
    digest.update(f"{os.path.abspath(path)}:{len(texts[path])}\n".encode())
  return Splits(kind="text", train=records(train_docs), evals={"validation": records(val_docs)},
                text_key="text", cache_key=f"text_files_{digest.hexdigest()[:16]}",
                summary=(f"text_files {pattern!r} ({len(paths)} files: {len(train_docs)} train / "
                         f"{len(val_docs)} validation documents)"))


def tfds_prepared(d, data_dir: str) -> Splits:
  """A TFDS dataset already prepared (array_record or parquet) in ``data_dir``."""
  if not d.tfds_name:
    raise ConfigError("data.tfds_name='' is empty; with data.name='tfds' name a prepared "
                      "TFDS dataset, e.g. 'lm1b' or 'wiki40b/en'")

  def read(split):
    try:
      source = tfds.data_source(d.tfds_name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # TFDS raises many types here (not found, wrong format, bad split)
      raise ConfigError(
          f"data.tfds_name={d.tfds_name!r} split {split!r} could not be read from "
          f"data_dir {data_dir!r} ({type(e).__name__}: {str(e).splitlines()[0]}). Prepare it there "
          "as array_record first, e.g. tfds.builder(name, data_dir=...).download_and_prepare("
          "file_format='array_record') or `tfds build NAME --data_dir=DIR "
          "--file_format=array_record`, and check data.train_split / data.eval_split") from None
    return _checked(source, f"data.tfds_name={d.tfds_name!r} split {split!r}",
                    f"prepare {d.tfds_name!r} again in {data_dir!r} (delete its folder first)")

  train, val = read(d.train_split), read(d.eval_split)
  for field, split, source in (("train_split", d.train_split, train),
                               ("eval_split", d.eval_split, val)):
    if not len(source):
      raise ConfigError(f"data.{field}={split!r} of {d.tfds_name!r} is empty")
  if d.text_key not in train[0]:
    raise ConfigError(f"data.text_key={d.text_key!r} is not a feature of "
                      f"{d.tfds_name!r}; its features: {', '.join(sorted(train[0]))}")
  name = d.tfds_name.replace("/", "_")
  return Splits(kind="text", train=train, evals={d.eval_split: val}, text_key=d.text_key,
                cache_key=f"tfds_{name}_{d.train_split}_{len(train)}",
                summary=(f"tfds {d.tfds_name} ({d.train_split}: {len(train)} / "
                         f"{d.eval_split}: {len(val)} records)"))


def _puzzle_splits(d, train, test, cache_key: str, summary: str, puzzle: str) -> Splits:
  size = ARC_SIDE if puzzle == "arc" else d.puzzle_size
  vocab = {"sudoku": puzzles.sudoku_vocab_size(size) if puzzle == "sudoku" else 0,
           "maze": puzzles.MAZE_VOCAB_SIZE, "arc": puzzles.ARC_VOCAB_SIZE}[puzzle]
  return Splits(kind="puzzle", train=train, evals={"test": test}, text_key="",
                cache_key=cache_key, summary=summary, puzzle=puzzle, puzzle_size=size,
                vocab_size=vocab)


ARC_SIDE = puzzles.ARC_MAX


def sudoku(d, data_dir: str) -> Splits:
  """Generated Sudokus of ``config.data`` (prepared on first use)."""
  config = builders.SudokuConfig.make(d.puzzle_size, d.puzzle_givens, d.puzzle_min_backtracks,
                                      d.num_train_examples, d.num_eval_examples)
  try:
    builder = builders.prepare(builders.XlpsSudoku, config, data_dir)
  except ValueError as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"data.puzzle_givens={d.puzzle_givens} / data.puzzle_min_backtracks="
                      f"{d.puzzle_min_backtracks}: {e}") from None
  read = lambda split: _checked(builder.as_data_source(split=split),  # noqa: E731
                                f"data.name='sudoku' split {split!r}", _rebuild_fix(builder))
  s = d.puzzle_size
  return _puzzle_splits(d, read("train"), read("test"), f"sudoku_{config.name}",
                        f"sudoku {s}x{s} ({d.puzzle_givens or 'minimal'} givens, >= "
                        f"{d.puzzle_min_backtracks} backtracks; {d.num_train_examples} train / "
                        f"{d.num_eval_examples} test)", "sudoku")


def maze(d, data_dir: str) -> Splits:
  """Generated mazes of ``config.data`` (prepared on first use)."""
  config = builders.MazeConfig.make(d.puzzle_size, d.num_train_examples, d.num_eval_examples)
  try:
    builder = builders.prepare(builders.XlpsMaze, config, data_dir)
  except ValueError as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"data.puzzle_size={d.puzzle_size} / data.num_eval_examples="
                      f"{d.num_eval_examples}: {e}") from None
  read = lambda split: _checked(builder.as_data_source(split=split),  # noqa: E731
                                f"data.name='maze' split {split!r}", _rebuild_fix(builder))
  n = d.puzzle_size
  return _puzzle_splits(d, read("train"), read("test"), f"maze_{config.name}",
                        f"maze {n}x{n} ({d.num_train_examples} train / {d.num_eval_examples} "
                        "test)", "maze")


def puzzle_files(d) -> Splits:
  """The public puzzle files in ``data.puzzle_dir`` (``data.puzzle_format``): HRM's
  ``train.csv`` / ``test.csv`` (Sudoku-Extreme, Maze-Hard) or ARC-AGI's ``data/`` folder;
  every row validated (ConfigError naming the file, the row and the problem)."""
  folder = os.path.expanduser(d.puzzle_dir)
  if not os.path.isdir(folder):
    raise ConfigError(f"data.puzzle_dir={d.puzzle_dir!r} is not a directory; valid: the folder "
                      "of train.csv and test.csv (sudoku_csv, maze_csv) or ARC-AGI's data/ "
                      "folder with training/ and evaluation/ (arc)")
  try:
    if d.puzzle_format == "arc":
      loaded = puzzles.load_arc_dir(folder)
    else:
      load = (puzzles.load_sudoku_csv if d.puzzle_format == "sudoku_csv"
              else puzzles.load_maze_csv)
      loaded = {}
      for split in ("train", "test"):
        path = os.path.join(folder, f"{split}.csv")
        if not os.path.isfile(path):
          raise ValueError(f"{path}: missing (data.puzzle_dir holds train.csv and test.csv)")
        loaded[split] = load(path, d.puzzle_size)
  except ValueError as e:
    raise ConfigError(f"data.puzzle_dir={d.puzzle_dir!r} (puzzle_format={d.puzzle_format!r}): "
                      f"{e}") from None
  inputs, labels = loaded["train"]
  total = len(inputs)
  if d.puzzle_subsample and d.puzzle_subsample < total:
    keep = np.sort(np.random.default_rng(_SUBSAMPLE_SEED).choice(total, d.puzzle_subsample,
                                                                 replace=False))
    inputs, labels = inputs[keep], labels[keep]
  train, test = PuzzleArrays(inputs, labels), PuzzleArrays(*loaded["test"])
  puzzle = {"sudoku_csv": "sudoku", "maze_csv": "maze", "arc": "arc"}[d.puzzle_format]
  digest = hashlib.sha256(f"{os.path.abspath(folder)}:{total}:{len(test)}".encode())
  return _puzzle_splits(d, train, test, f"puzzle_files_{digest.hexdigest()[:16]}",
                        f"{d.puzzle_format} {d.puzzle_dir!r} ({len(train)} of {total} train / "
                        f"{len(test)} test examples)", puzzle)
