"""The data section: every data key with its default, and ``check_data``.

Also what the data section's checks need to know of the data itself: the algorithmic tasks'
example lengths and the byte tokenizer's vocabulary (``xlps.data.tokenizers`` takes its
special-id count and vocabulary size from here, so that this package imports nothing of
``xlps.data``).
"""

from __future__ import annotations

import ml_collections

from xlps import families as families_lib
from xlps.config.checks import ConfigError, check_choice, check_int, check_keys, check_str


DATA_NAMES = ("stdlib", "algorithmic", "text_files", "tfds")
TASKS = ("copy", "reverse", "addition")
TOKENIZERS = ("byte", "sentencepiece", "file")
# The byte tokenizer (xlps.data.tokenizers): NUM_SPECIAL special ids (PAD, BOS, EOS, MASK),
# then the 256 byte values.
NUM_SPECIAL = 4
BYTE_VOCAB_SIZE = NUM_SPECIAL + 256


def data_config() -> ml_collections.ConfigDict:
  """Every data key with its default (the stdlib byte corpus)."""
  d = ml_collections.ConfigDict()
  d.name = "stdlib"          # stdlib | algorithmic | text_files | tfds
  d.task = "copy"            # algorithmic: copy | reverse | addition
  d.glob = ""                # text_files: glob of the user's files (one document per file)
  d.tfds_name = ""           # tfds: a prepared dataset, e.g. "lm1b" or "wiki40b/en"
  d.text_key = "text"        # tfds: feature holding the text
  d.train_split = "train"    # tfds: split to train on
  d.eval_split = "validation"  # tfds: split to evaluate on
  d.data_dir = ""            # prepared TFDS data; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
  d.seq_len = 128            # tokens per example (packed LM length; max source/target length)
  d.tokenizer = "byte"       # byte | sentencepiece (trained here) | file (data.tokenizer_path)
  d.sp_vocab_size = 1024     # sentencepiece: vocab trained locally on the train split
  d.tokenizer_path = ""      # file: a SentencePiece .model, an HF tokenizer.json or a local HF
                             # snapshot directory; a run keeps a copy in WORKDIR/tokenizer
  d.mlm_probability = 0.15   # encoder_mlm: tokens selected (80% MASK, 10% random, 10% kept)
  d.train_min_len = 1        # algorithmic: shortest train/test operand length
  d.train_max_len = 20       # algorithmic: longest train/test operand length
  d.test_max_len = 40        # algorithmic: test_long lengths are train_max_len+1..test_max_len
  d.num_train_examples = 20000  # algorithmic: train split size
  d.num_eval_examples = 1000    # algorithmic: size of test and of test_long
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


def check_data(config: ml_collections.ConfigDict, process_index: int = 0,
               process_count: int = 1) -> None:
  """The data section and what it must agree with (family, batch, processes)."""
  d = config.data
  check_keys(d, "data", tuple(data_config()), "data")
  check_choice("data.name", d.name, DATA_NAMES)
  check_choice("data.task", d.task, TASKS)
  check_choice("data.tokenizer", d.tokenizer, TOKENIZERS)
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
  kind = "seq2seq" if d.name == "algorithmic" else "text"
  layout = families_lib.FAMILIES[config.model.family].layout
  if kind not in families_lib.LAYOUT_DATASETS[layout]:
    fitting = [name for name, fam in families_lib.FAMILIES.items()
               if kind in families_lib.LAYOUT_DATASETS[fam.layout]]
    raise ConfigError(f"model.family={config.model.family!r} does not fit data.name={d.name!r}; "
                      f"valid families: {', '.join(fitting)}")
  if kind == "seq2seq":
    if d.tokenizer != "byte":
      raise ConfigError(f"data.tokenizer={d.tokenizer!r}: algorithmic tasks use 'byte'")
    need = seq2seq_length(d.task, d.test_max_len, layout)
    if d.seq_len < need:
      raise ConfigError(f"data.seq_len={d.seq_len} is too small for task {d.task!r} with "
                        f"test_max_len={d.test_max_len} and family {config.model.family!r}: the "
                        f"longest example needs {need} tokens; set seq_len >= {need}")
