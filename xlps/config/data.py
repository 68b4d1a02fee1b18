"""The data section: every data key with its default, and ``check_data``.

Also what the data section's checks need to know of the data itself: the algorithmic tasks'
example lengths and the byte tokenizer's vocabulary (``xlps.data.tokenizers`` takes its
special-id count and vocabulary size from here, so that this package imports nothing of
``xlps.data``).
"""

from __future__ import annotations

import ml_collections

from xlps import families as families_lib
from xlps.config.checks import (ConfigError, check_bool, check_choice, check_int, check_keys,
                                check_number, check_str)


DATA_NAMES = ("stdlib", "algorithmic", "text_files", "tfds", "sudoku", "maze", "puzzle_files")
# Puzzle data (xlps.data.puzzles): fixed token ids, no tokenizer, the family layout "puzzle".
PUZZLE_NAMES = ("sudoku", "maze", "puzzle_files")
PUZZLE_FORMATS = ("sudoku_csv", "maze_csv", "arc")
SUDOKU_SIZES = (4, 6, 9)
MAZE_SIZES = (5, 100)        # smallest and largest maze side
ARC_SIZE = 30                # ARC grids sit in a 30x30 canvas
TASKS = ("copy", "reverse", "addition")
TOKENIZERS = ("byte", "sentencepiece", "file", "none")
# The byte tokenizer (xlps.data.tokenizers): NUM_SPECIAL special ids (PAD, BOS, EOS, MASK),
# then the 256 byte values.
NUM_SPECIAL = 4
BYTE_VOCAB_SIZE = NUM_SPECIAL + 256


def data_config() -> ml_collections.ConfigDict:
  """Every data key with its default (the stdlib byte corpus)."""
  d = ml_collections.ConfigDict()
  d.name = "stdlib"          # stdlib | algorithmic | text_files | tfds | sudoku | maze |
                             # puzzle_files (the last three: data.tokenizer='none')
  d.task = "copy"            # algorithmic: copy | reverse | addition
  d.glob = ""                # text_files: glob of the user's files (one document per file)
  d.tfds_name = ""           # tfds: a prepared dataset, e.g. "lm1b" or "wiki40b/en"
  d.text_key = "text"        # tfds: feature holding the text
  d.train_split = "train"    # tfds: split to train on
  d.eval_split = "validation"  # tfds: split to evaluate on
  d.data_dir = ""            # prepared TFDS data; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
  d.seq_len = 128            # tokens per example (packed LM length; max source/target length)
  d.tokenizer = "byte"       # byte | sentencepiece (trained here) | file (data.tokenizer_path) |
                             # none (puzzle data: fixed token ids)
  d.sp_vocab_size = 1024     # sentencepiece: vocab trained locally on the train split
  d.tokenizer_path = ""      # file: a SentencePiece .model, an HF tokenizer.json or a local HF
                             # snapshot directory; a run keeps a copy in WORKDIR/tokenizer
  d.mlm_probability = 0.15   # encoder_mlm: tokens selected (80% MASK, 10% random, 10% kept)
  d.train_min_len = 1        # algorithmic: shortest train/test operand length
  d.train_max_len = 20       # algorithmic: longest train/test operand length
  d.test_max_len = 40        # algorithmic: test_long lengths are train_max_len+1..test_max_len
  d.num_train_examples = 20000  # algorithmic, sudoku, maze: train split size
  d.num_eval_examples = 1000    # algorithmic: size of test and of test_long; sudoku, maze: test
  # Puzzles (data.name sudoku | maze | puzzle_files; xlps.data.puzzles has the token ids).
  # data.seq_len must be the puzzle length: puzzle_size**2 (ARC: 900).
  d.puzzle_size = 9          # sudoku / sudoku_csv: 4, 6 or 9; maze / maze_csv: side 5..100
  d.puzzle_givens = 30       # sudoku: givens left (0 = as few as uniqueness allows)
  d.puzzle_min_backtracks = 0  # sudoku: drop puzzles the solver finishes with fewer backtracks
  d.puzzle_format = "sudoku_csv"  # puzzle_files: sudoku_csv | maze_csv | arc
  d.puzzle_dir = ""          # puzzle_files: train.csv + test.csv (HRM's CSVs), or ARC-AGI's
                             # data/ folder (training/*.json, evaluation/*.json)
  d.puzzle_subsample = 0     # puzzle_files: train on this many train examples (fixed random
                             # choice; 0 = all), e.g. 1000 as TRM's Sudoku-Extreme-1k
  d.augment = False          # puzzles: random symmetry per train example (Sudoku: digits,
                             # bands/rows, stacks/columns, transpose; ARC: dihedral, colours)
  d.eval_batches = 8         # number of eval batches per split (0 = whole split)
  d.worker_count = 0         # grain worker processes (0 = in-process); resume with the same value
  d.num_shards = 0            # train-data shards (a multiple of the process count); 0 = one per
                              # process. Fix it to keep the exact data order across restarts
                              # on a different number of processes.
  return d


def seq2seq_length(task: str, max_len: int, layout: str) -> int:
  """The ``data.seq_len`` a ``task`` example with operands up to ``max_len`` needs in
  ``layout`` (``lm``: ``source EOS target EOS`` in one row; ``seq2seq``: the longer side)."""
  source, target = max_lengths(task, max_len)
  return source + target + 1 if layout == "lm" else max(source, target + 1)


def max_lengths(task: str, max_len: int) -> tuple[int, int]:
  """Longest (source, target) of ``task`` at operand length ``max_len`` (target w/o EOS)."""
  if task == "addition":
    return 2 * max_len + 1, max_len + 1
  return max_len, max_len


def puzzle_length(d: ml_collections.ConfigDict) -> int:
  """Tokens per puzzle of data section ``d`` (puzzle data names only)."""
  if d.name == "puzzle_files" and d.puzzle_format == "arc":
    return ARC_SIZE * ARC_SIZE
  return d.puzzle_size ** 2


def _check_puzzles(d: ml_collections.ConfigDict) -> None:
  check_choice("data.puzzle_format", d.puzzle_format, PUZZLE_FORMATS)
  check_str("data.puzzle_dir", d.puzzle_dir)
  check_bool("data.augment", d.augment)
  for key in ("puzzle_givens", "puzzle_min_backtracks", "puzzle_subsample"):
    check_int(f"data.{key}", d[key], 0)
  if d.tokenizer != "none":
    raise ConfigError(f"data.tokenizer={d.tokenizer!r} does not apply to data.name={d.name!r}: "
                      "puzzles have fixed token ids; valid: data.tokenizer='none'")
  kind = d.puzzle_format if d.name == "puzzle_files" else d.name
  if kind in ("sudoku", "sudoku_csv"):
    check_choice("data.puzzle_size", d.puzzle_size, SUDOKU_SIZES)
  elif kind in ("maze", "maze_csv"):
    check_number("data.puzzle_size", d.puzzle_size, MAZE_SIZES[0], MAZE_SIZES[1], integer=True)
  if d.name == "sudoku" and d.puzzle_givens > d.puzzle_size ** 2:
    raise ConfigError(f"data.puzzle_givens={d.puzzle_givens} exceeds the {d.puzzle_size ** 2} "
                      f"cells of a {d.puzzle_size}x{d.puzzle_size} Sudoku; valid: 0 (as few as "
                      f"uniqueness allows) .. {d.puzzle_size ** 2}")
  if d.augment and kind in ("maze", "maze_csv"):
    raise ConfigError("data.augment=True: mazes have no augmentation here (HRM's default); "
                      "valid: data.augment=False")
  if d.name == "puzzle_files" and not d.puzzle_dir:
    raise ConfigError(f"data.puzzle_dir='' is empty; with data.name='puzzle_files' and "
                      f"puzzle_format={d.puzzle_format!r} name the folder holding "
                      + ("training/ and evaluation/ task JSONs (ARC-AGI's data/)"
                         if d.puzzle_format == "arc" else "train.csv and test.csv"))
  need = puzzle_length(d)
  if d.seq_len != need:
    what = ("ARC's 30x30 canvas" if need == ARC_SIZE * ARC_SIZE else
            f"a {d.puzzle_size}x{d.puzzle_size} {'Sudoku' if 'sudoku' in kind else 'maze'}")
    raise ConfigError(f"data.seq_len={d.seq_len} does not match data.name={d.name!r}: "
                      f"{what} is {need} tokens; valid: data.seq_len={need}")


def dataset_kind(name: str) -> str:
  """The kind of dataset ``data.name`` gives: text, seq2seq or puzzle."""
  return "puzzle" if name in PUZZLE_NAMES else "seq2seq" if name == "algorithmic" else "text"


def layout_fits(layout: str, kind: str) -> bool:
  """Whether batch ``layout`` can be made from a dataset of ``kind`` (puzzle data: only the
  layout "puzzle", whether or not xlps.families lists it yet)."""
  if kind == "puzzle" or layout == "puzzle":
    return kind == "puzzle" and layout == "puzzle"
  return kind in families_lib.LAYOUT_DATASETS.get(layout, ())


def check_data(config: ml_collections.ConfigDict, process_index: int = 0,
               process_count: int = 1) -> None:
  """The data section and what it must agree with (family, batch, processes)."""
  d = config.data
  check_keys(d, "data", tuple(data_config()), "data")
  check_choice("data.name", d.name, DATA_NAMES)
  check_choice("data.task", d.task, TASKS)
  check_choice("data.tokenizer", d.tokenizer, TOKENIZERS)
  if d.tokenizer == "none" and d.name not in PUZZLE_NAMES:
    raise ConfigError(f"data.tokenizer='none' is for puzzle data ({', '.join(PUZZLE_NAMES)}), "
                      f"not data.name={d.name!r}; valid: byte, sentencepiece, file")
  check_choice("model.family", config.model.family, tuple(families_lib.FAMILIES))
  for key, minimum in (("seq_len", 2), ("sp_vocab_size", 1), ("train_min_len", 1),
                       ("num_train_examples", 1), ("num_eval_examples", 1), ("eval_batches", 0),
                       ("worker_count", 0), ("num_shards", 0)):
    check_int(f"data.{key}", d[key], minimum)
  check_int("data.train_max_len", d.train_max_len, d.train_min_len)
  check_int("data.test_max_len", d.test_max_len, d.train_max_len + 1)
  for key in ("glob", "tfds_name", "text_key", "train_split", "eval_split", "data_dir",
              "tokenizer_path"):
    check_str(f"data.{key}", d[key])
  if d.tokenizer_path and d.tokenizer != "file":
    raise ConfigError(f"data.tokenizer_path={d.tokenizer_path!r} is only read with "
                      f"data.tokenizer='file' (not {d.tokenizer!r}); valid: data.tokenizer=file, "
                      "or data.tokenizer_path=''")
  if (isinstance(d.mlm_probability, bool) or not isinstance(d.mlm_probability, (int, float))
      or not 0.0 < d.mlm_probability < 1.0):
    raise ConfigError(f"data.mlm_probability={d.mlm_probability!r} must be a number in (0, 1)")
  batch = config.train.batch_size
  check_int("train.batch_size", batch, 1)
  check_int("process_count", process_count, 1)
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} must be in [0, {process_count})")
  if batch % process_count:
    raise ConfigError(f"train.batch_size={batch} (global) is not divisible by "
                      f"process_count={process_count}; use a multiple of {process_count}")
  shards = d.num_shards or process_count
  if shards % process_count or batch % shards:
    raise ConfigError(f"data.num_shards={d.num_shards} must be a multiple of process_count="
                      f"{process_count} that divides train.batch_size={batch} (0 = one shard "
                      "per process)")
  kind = dataset_kind(d.name)
  layout = families_lib.FAMILIES[config.model.family].layout
  if not layout_fits(layout, kind):
    fitting = [name for name, fam in families_lib.FAMILIES.items() if layout_fits(fam.layout, kind)]
    raise ConfigError(f"model.family={config.model.family!r} does not fit data.name={d.name!r}; "
                      f"valid families: {', '.join(fitting) or 'none registered yet'}")
  if kind == "puzzle":
    _check_puzzles(d)
  if kind == "seq2seq":
    if d.tokenizer != "byte":
      raise ConfigError(f"data.tokenizer={d.tokenizer!r}: algorithmic tasks use 'byte'")
    need = seq2seq_length(d.task, d.test_max_len, layout)
    if d.seq_len < need:
      raise ConfigError(f"data.seq_len={d.seq_len} is too small for task {d.task!r} with "
                        f"test_max_len={d.test_max_len} and family {config.model.family!r}: the "
                        f"longest example needs {need} tokens; set seq_len >= {need}")
