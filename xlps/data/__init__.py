"""Data: embedded TFDS datasets, tokenizers and grain pipelines; ``build(config)`` is the entry.

``build(config, process_index=, process_count=)`` validates ``config.data`` (ValueError naming
the field, the value and what is valid), prepares the dataset on first use (cached in
``data.data_dir``) and returns a ``Pipeline``:

    pipeline.train_iter()        endless checkpointable batches (get_state / set_state)
    pipeline.eval_batches(split) this process's rows of the global eval batches (split in
                                 pipeline.eval_splits): finite, identical on every call and
                                 for any process count; each process reads only its shards
    pipeline.padding_batch()     weight-0 batch for a process whose eval rows ran out first
    pipeline.vocab_size, pipeline.unigram_entropy, pipeline.describe()

Batch keys per ``config.model.family`` (leading dim = local batch; int32, weights float32):
decoder_lm: inputs, targets, segment_ids, positions, weights; encoder_mlm: input_ids,
attention_mask, token_type_ids, labels, weights; encoder_decoder: inputs, targets, weights.
Datasets: ``stdlib`` (the running Python's standard library; its contents and therefore
the numbers differ between Python versions), ``algorithmic`` (copy / reverse / addition),
``text_files`` (a glob of your files) and ``tfds`` (any TFDS dataset prepared as
array_record). Nothing is downloaded.
"""

from __future__ import annotations

import os

import ml_collections

from xlps.config import FAMILIES
from xlps.data import builders, sources
from xlps.data import tokenizers as tok_lib
from xlps.data.pipeline import Pipeline, sample_indices

__all__ = ["build", "data_config", "validate", "Pipeline", "NAMES"]

NAMES = ("stdlib", "algorithmic", "text_files", "tfds")
_FAMILIES_OF_KIND = {"text": ("decoder_lm", "encoder_mlm"),
                     "seq2seq": ("encoder_decoder", "decoder_lm")}


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
  d.tokenizer = "byte"       # byte | sentencepiece
  d.sp_vocab_size = 1024     # sentencepiece: vocab trained locally on the train split
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


def _check_int(field: str, value, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"config.{field}={value!r} must be an integer >= {minimum}")


def _check_choice(field: str, value, valid: tuple) -> None:
  if value not in valid:
    raise ValueError(f"config.{field}={value!r} is not valid; choose one of: {', '.join(valid)}")


def validate(config: ml_collections.ConfigDict, process_index: int = 0,
             process_count: int = 1) -> None:
  """Checks everything that can be checked before touching any data."""
  d, known = config.data, data_config()
  for key in d:
    if key not in known:
      raise ValueError(f"config.data.{key} is not a data key; valid keys: {', '.join(known)}")
  _check_choice("data.name", d.name, NAMES)
  _check_choice("data.task", d.task, builders.TASKS)
  _check_choice("data.tokenizer", d.tokenizer, tok_lib.TOKENIZERS)
  _check_choice("model.family", config.model.family, FAMILIES)
  for key, minimum in (("seq_len", 2), ("sp_vocab_size", 1), ("train_min_len", 1),
                       ("num_train_examples", 1), ("num_eval_examples", 1), ("eval_batches", 0),
                       ("worker_count", 0)):
    _check_int(f"data.{key}", d[key], minimum)
  _check_int("data.train_max_len", d.train_max_len, d.train_min_len)
  _check_int("data.test_max_len", d.test_max_len, d.train_max_len + 1)
  if not 0.0 < float(d.mlm_probability) < 1.0:
    raise ValueError(f"config.data.mlm_probability={d.mlm_probability!r} must be in (0, 1)")
  _check_int("train.batch_size", config.train.batch_size, 1)
  _check_int("process_count", process_count, 1)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} must be in [0, {process_count})")
  if config.train.batch_size % process_count:
    raise ValueError(f"config.train.batch_size={config.train.batch_size} (global) is not divisible "
                     f"by process_count={process_count}; use a multiple of {process_count}")
  _check_int("data.num_shards", d.num_shards, 0)
  shards = d.num_shards or process_count
  if shards % process_count or config.train.batch_size % shards:
    raise ValueError(f"config.data.num_shards={d.num_shards} must be a multiple of "
                     f"process_count={process_count} that divides train.batch_size="
                     f"{config.train.batch_size} (0 = one shard per process)")
  kind = "seq2seq" if d.name == "algorithmic" else "text"
  if config.model.family not in _FAMILIES_OF_KIND[kind]:
    raise ValueError(f"config.model.family={config.model.family!r} does not fit "
                     f"data.name={d.name!r}; valid families: {', '.join(_FAMILIES_OF_KIND[kind])}")
  if kind == "seq2seq":
    if d.tokenizer != "byte":
      raise ValueError(f"config.data.tokenizer={d.tokenizer!r}: algorithmic tasks use 'byte'")
    source, target = builders.max_lengths(d.task, d.test_max_len)
    need = source + target + 1 if config.model.family == "decoder_lm" else max(source, target + 1)
    if d.seq_len < need:
      raise ValueError(f"config.data.seq_len={d.seq_len} is too small for task {d.task!r} with "
                       f"test_max_len={d.test_max_len} and family {config.model.family!r}: the "
                       f"longest example needs {need} tokens; set seq_len >= {need}")


def _sentencepiece(splits: sources.Splits, vocab_size: int,
                   data_dir: str) -> tok_lib.SentencePieceTokenizer:
  """The SentencePiece model of ``splits``' train split, trained once and cached."""
  tok_lib.require_sentencepiece()
  folder = os.path.join(data_dir, "xlps_sentencepiece")
  path = os.path.join(folder, f"{splits.cache_key}_v{vocab_size}.model")
  with builders.exclusive_lock(folder, os.path.basename(path)):
    if not os.path.exists(path):
      docs = splits.train
      texts = (docs[i][splits.text_key] for i in sample_indices(len(docs)))
      tok_lib.train_sentencepiece((t.decode("utf-8") if isinstance(t, bytes) else t
                                   for t in texts), vocab_size, path)
  with open(path, "rb") as f:
    return tok_lib.SentencePieceTokenizer(f.read())


def build(config: ml_collections.ConfigDict, *, process_index: int = 0,
          process_count: int = 1) -> Pipeline:
  """The data pipeline of ``config`` for process ``process_index`` of ``process_count``.

  ``config.train.batch_size`` is global; this process gets batch_size // process_count rows
  per batch, read from its own shard of the train split.
  """
  validate(config, process_index, process_count)
  d = config.data
  data_dir = os.path.expanduser(d.data_dir or os.environ.get("TFDS_DATA_DIR", "")
                                or "~/tensorflow_datasets")
  if d.name == "algorithmic":
    splits = sources.algorithmic(d, data_dir)
  elif d.name == "stdlib":
    splits = sources.stdlib(data_dir)
  elif d.name == "text_files":
    splits = sources.text_files(d.glob, require_utf8=d.tokenizer == "sentencepiece")
  else:
    splits = sources.tfds_prepared(d, data_dir)
  if d.tokenizer == "sentencepiece":
    tokenizer = _sentencepiece(splits, d.sp_vocab_size, data_dir)
  else:
    tokenizer = tok_lib.ByteTokenizer()
  if d.worker_count:
    _mark_absl_flags_parsed()
  return Pipeline(splits=splits, tokenizer=tokenizer, family=config.model.family,
                  seq_len=d.seq_len, batch_size=config.train.batch_size,
                  process_index=process_index, process_count=process_count,
                  num_shards=d.num_shards or process_count, seed=config.seed,
                  mlm_probability=float(d.mlm_probability), eval_batches=d.eval_batches,
                  worker_count=d.worker_count)


def _mark_absl_flags_parsed() -> None:
  """grain worker processes read absl flags; outside ``absl.app.run`` they are unparsed."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
