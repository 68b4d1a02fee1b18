"""Data: embedded TFDS datasets, tokenizers and grain pipelines; ``build(config)`` is the entry.

``build(config, process_index=, process_count=)`` validates ``config.data`` (``ConfigError``
naming the field, the value and what is valid), prepares the dataset on first use (cached in
``data.data_dir``) and returns a ``Pipeline``:

    pipeline.train_iter()        endless checkpointable batches (get_state / set_state)
    pipeline.eval_batches(split) this process's rows of the global eval batches (split in
                                 pipeline.eval_splits): finite, identical on every call and
                                 for any process count; each process reads only its shards
    pipeline.padding_batch()     weight-0 batch for a process whose eval rows ran out first
    pipeline.vocab_size, pipeline.unigram_entropy, pipeline.describe(), pipeline.tokenizer

Tokenizers (``data.tokenizer``): ``byte``, ``sentencepiece`` (trained on the train split and
cached in ``data.data_dir``) or ``file`` (``data.tokenizer_path``: a SentencePiece
``.model``, an HF ``tokenizer.json`` or a local HF snapshot). A training run keeps its
tokenizer's files in ``WORKDIR/tokenizer`` (``keep_tokenizer``; none for ``byte``), and
``run_tokenizer`` gives that copy back to resumed runs, generation and conversion, so they
use the ids the model was trained on, even when the original file is gone.

Batch layouts (the family's, ``xlps.families``; keys named there; leading dim = local batch):
``lm``: inputs, targets, segment_ids, positions, weights; ``mlm``: inputs, input_mask,
token_types, targets, weights; ``seq2seq``: inputs, targets, weights; ``puzzle`` (puzzle
data): inputs, targets (the solution's tokens), weights (1 on scored cells), int32 / float32
[B, L] with L = data.seq_len = the puzzle's length.
Datasets: ``stdlib`` (the running Python's standard library; its contents and therefore
the numbers differ between Python versions), ``algorithmic`` (copy / reverse / addition),
``text_files`` (a glob of your files), ``tfds`` (any TFDS dataset prepared as
array_record) and the puzzles of ``xlps.data.puzzles`` (fixed token ids, no tokenizer:
``data.tokenizer='none'``; ``pipeline.tokenizer`` is None): ``sudoku`` and ``maze``
(generated from a fixed seed) and ``puzzle_files`` (HRM's Sudoku-Extreme / Maze-Hard CSVs
or ARC-AGI task folders in ``data.puzzle_dir``). Nothing is downloaded.
"""

from __future__ import annotations

import os

import ml_collections

from xlps import config as config_lib
from xlps import families
from xlps.config.data import PUZZLE_NAMES
from xlps.data import builders, sources
from xlps.data import tokenizers as tok_lib
from xlps.data.pipeline import Pipeline, PuzzlePipeline, sample_indices

__all__ = ["build", "Pipeline", "PuzzlePipeline", "run_tokenizer", "keep_tokenizer"]

KEPT_TOKENIZER = "tokenizer"  # WORKDIR/tokenizer: the run's tokenizer files (absent for byte)


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


def configured_tokenizer(config: ml_collections.ConfigDict) -> tok_lib.Tokenizer | None:
  """``config.data``'s tokenizer where it needs no data: byte, or the files at
  ``data.tokenizer_path``; None for ``sentencepiece`` (``build`` trains it) and for ``none``
  (puzzle data has no tokenizer)."""
  d = config.data
  if d.tokenizer == "none":
    return None
  if d.tokenizer == "byte":
    return tok_lib.ByteTokenizer()
  if d.tokenizer == "sentencepiece":
    return None
  if not d.tokenizer_path:
    raise config_lib.ConfigError(
        "data.tokenizer='file' needs data.tokenizer_path (it is ''); valid: "
        f"{tok_lib.VALID_FILES}. A converted HF model was trained on its own tokenizer's ids: "
        "give that tokenizer (launch.convert --tokenizer=PATH keeps it with the workdir)")
  return tok_lib.load(d.tokenizer_path)


def run_tokenizer(config: ml_collections.ConfigDict,
                  workdir: str | os.PathLike) -> tok_lib.Tokenizer | None:
  """The tokenizer a run in ``workdir`` uses, where it is known before any data is read.

  ``WORKDIR/tokenizer`` (kept by an earlier run or by ``launch.convert``) wins, after a check
  that ``config.data`` names the same tokenizer (ConfigError naming both otherwise; a
  ``data.tokenizer_path`` that no longer exists is not compared); without one, the
  configured tokenizer (``configured_tokenizer``). Workdirs without the folder (byte runs,
  runs from before it existed) therefore use what their config says.
  """
  from etils import epath
  kept_dir = epath.Path(os.fspath(workdir)) / KEPT_TOKENIZER
  if not kept_dir.exists() or config.data.tokenizer == "none":
    return configured_tokenizer(config)
  kept = tok_lib.load(kept_dir, field=f"the run's tokenizer {kept_dir}")
  d = config.data
  problem = None
  if d.tokenizer == "byte":
    problem = "data.tokenizer='byte'"
  elif d.tokenizer == "sentencepiece" and kept.vocab_size != d.sp_vocab_size:
    problem = f"data.tokenizer='sentencepiece' with data.sp_vocab_size={d.sp_vocab_size}"
  elif d.tokenizer == "file" and d.tokenizer_path and epath.Path(d.tokenizer_path).exists():
    configured = tok_lib.load(d.tokenizer_path)
    if configured.fingerprint != kept.fingerprint:
      problem = f"data.tokenizer_path={d.tokenizer_path!r}: {configured.describe()}"
  if problem:
    raise config_lib.ConfigError(
        f"{problem} differs from the tokenizer this run's model was trained with, kept in "
        f"{kept_dir}: {kept.describe()}; valid: the kept tokenizer (data.tokenizer_path="
        f"{os.fspath(kept_dir)!r} with data.tokenizer=file), or a new workdir")
  return kept


def keep_tokenizer(tokenizer: tok_lib.Tokenizer | None, workdir: str | os.PathLike) -> None:
  """Writes ``tokenizer``'s files to ``WORKDIR/tokenizer`` unless a tokenizer is kept there
  already (the byte tokenizer has no files, puzzle data no tokenizer: nothing is written)."""
  from etils import epath
  kept_dir = epath.Path(os.fspath(workdir)) / KEPT_TOKENIZER
  if tokenizer is None or not tokenizer.files or kept_dir.exists():
    return
  staging = kept_dir.parent / f"{KEPT_TOKENIZER}.tmp{os.getpid()}"
  tokenizer.save(staging)
  staging.rename(kept_dir)


def check_tokenizer(config: ml_collections.ConfigDict, tokenizer: tok_lib.Tokenizer) -> None:
  """ConfigError naming both when ``tokenizer`` cannot feed ``config``'s model: a tokenizer
  file's vocabulary must be the model's exactly (a model built for or converted from it);
  byte and locally trained ones must fit in it; encoder_mlm needs a mask token."""
  vocab = config.model.vocab_size
  if config.data.tokenizer == "file" and tokenizer.vocab_size != vocab:
    raise config_lib.ConfigError(
        f"the tokenizer {tokenizer.describe()} does not match the model: model.vocab_size="
        f"{vocab}; valid: the tokenizer the model was built for or converted from (vocab "
        f"{vocab}), or model.vocab_size={tokenizer.vocab_size} for a new model")
  if config.model.family == "encoder_mlm" and tokenizer.mask_id is None:
    raise config_lib.ConfigError(
        f"model.family='encoder_mlm' needs a mask token, and the tokenizer "
        f"{tokenizer.describe()} has none (looked for [MASK] / <mask>)")


def build(config: ml_collections.ConfigDict, *, process_index: int = 0, process_count: int = 1,
          tokenizer: tok_lib.Tokenizer | None = None) -> Pipeline:
  """The data pipeline of ``config`` for process ``process_index`` of ``process_count``.

  ``config.train.batch_size`` is global; this process gets batch_size // process_count rows
  per batch, read from its own shard of the train split. ``tokenizer`` (e.g. a run's kept
  one, ``run_tokenizer``) replaces the configured one. Puzzle data (``data.name`` sudoku,
  maze, puzzle_files) gives a ``PuzzlePipeline`` and reads no tokenizer.
  """
  config_lib.check_data(config, process_index, process_count)
  if config.data.name in PUZZLE_NAMES:
    return _puzzle_pipeline(config, process_index, process_count)
  if tokenizer is None:
    tokenizer = configured_tokenizer(config)
  if tokenizer is not None:  # checked before any data is read
    check_tokenizer(config, tokenizer)
  d = config.data
  data_dir = _data_dir(d)
  if d.name == "algorithmic":
    splits = sources.algorithmic(d, data_dir)
  elif d.name == "stdlib":
    splits = sources.stdlib(data_dir)
  elif d.name == "text_files":
    splits = sources.text_files(d.glob, require_utf8=d.tokenizer != "byte")
  else:
    splits = sources.tfds_prepared(d, data_dir)
  if tokenizer is None:
    tokenizer = _sentencepiece(splits, d.sp_vocab_size, data_dir)
    check_tokenizer(config, tokenizer)
  if d.worker_count:
    _mark_absl_flags_parsed()
  layout = families.FAMILIES[config.model.family].layout
  split_lengths = {split: min(d.seq_len, config_lib.seq2seq_length(d.task, n, layout))
                   for split, n in splits.longest.items()}
  return Pipeline(splits=splits, tokenizer=tokenizer, layout=layout, seq_len=d.seq_len,
                  split_lengths=split_lengths, batch_size=config.train.batch_size,
                  process_index=process_index, process_count=process_count,
                  num_shards=d.num_shards or process_count, seed=config.seed,
                  mlm_probability=float(d.mlm_probability), eval_batches=d.eval_batches,
                  worker_count=d.worker_count)


def _data_dir(d: ml_collections.ConfigDict) -> str:
  """Where prepared datasets live (``data.data_dir``, else $TFDS_DATA_DIR or
  ~/tensorflow_datasets); ConfigError if a file stands in the way."""
  data_dir = os.path.expanduser(d.data_dir or os.environ.get("TFDS_DATA_DIR", "")
                                or "~/tensorflow_datasets")
  if "://" not in data_dir:  # the first existing folder on the way must be a folder
    existing = os.path.abspath(data_dir)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
      existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
      why = ("it is a file" if existing == os.path.abspath(data_dir) else
             f"{existing!r} is a file")
      raise config_lib.ConfigError(
          f"data.data_dir={d.data_dir or data_dir!r} cannot be used ({why}, not a directory); "
          "valid: a directory for prepared datasets (created if missing), or '' for "
          "$TFDS_DATA_DIR or ~/tensorflow_datasets")
  return data_dir


def _puzzle_pipeline(config: ml_collections.ConfigDict, process_index: int,
                     process_count: int) -> PuzzlePipeline:
  """The ``PuzzlePipeline`` of puzzle data (config already checked)."""
  d = config.data
  if d.name == "sudoku":
    splits = sources.sudoku(d, _data_dir(d))
  elif d.name == "maze":
    splits = sources.maze(d, _data_dir(d))
  else:
    splits = sources.puzzle_files(d)
  if d.worker_count:
    _mark_absl_flags_parsed()
  return PuzzlePipeline(splits=splits, seq_len=d.seq_len, batch_size=config.train.batch_size,
                        process_index=process_index, process_count=process_count,
                        num_shards=d.num_shards or process_count, seed=config.seed,
                        eval_batches=d.eval_batches, augment=d.augment,
                        worker_count=d.worker_count)


def _mark_absl_flags_parsed() -> None:
  """grain worker processes read absl flags; outside ``absl.app.run`` they are unparsed."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
