"""Data: embedded TFDS datasets, tokenizers and grain pipelines; ``build(config)`` is the entry.

``build(config, process_index=, process_count=)`` validates ``config.data`` (``ConfigError``
naming the field, the value and what is valid), prepares the dataset on first use (cached in
``data.data_dir``) and returns a ``Pipeline``:

    pipeline.train_iter()        endless checkpointable batches (get_state / set_state)
    pipeline.eval_batches(split) this process's rows of the global eval batches (split in
                                 pipeline.eval_splits): finite, identical on every call and
                                 for any process count; each process reads only its shards
    pipeline.padding_batch()     weight-0 batch for a process whose eval rows ran out first
    pipeline.vocab_size, pipeline.unigram_entropy, pipeline.describe()

Batch layouts (the family's, ``xlps.families``; keys named there; leading dim = local batch):
``lm``: inputs, targets, segment_ids, positions, weights; ``mlm``: inputs, input_mask,
token_types, targets, weights; ``seq2seq``: inputs, targets, weights.
Datasets: ``stdlib`` (the running Python's standard library; its contents and therefore
the numbers differ between Python versions), ``algorithmic`` (copy / reverse / addition),
``text_files`` (a glob of your files) and ``tfds`` (any TFDS dataset prepared as
array_record). Nothing is downloaded.
"""

from __future__ import annotations

import os

import ml_collections

from xlps import config as config_lib
from xlps import families
from xlps.data import builders, sources
from xlps.data import tokenizers as tok_lib
from xlps.data.pipeline import Pipeline, sample_indices

__all__ = ["build", "Pipeline"]


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
  config_lib.check_data(config, process_index, process_count)
  d = config.data
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
  layout = families.FAMILIES[config.model.family].layout
  split_lengths = {split: min(d.seq_len, config_lib.seq2seq_length(d.task, n, layout))
                   for split, n in splits.longest.items()}
  return Pipeline(splits=splits, tokenizer=tokenizer, layout=layout, seq_len=d.seq_len,
                  split_lengths=split_lengths, batch_size=config.train.batch_size,
                  process_index=process_index, process_count=process_count,
                  num_shards=d.num_shards or process_count, seed=config.seed,
                  mlm_probability=float(d.mlm_probability), eval_batches=d.eval_batches,
                  worker_count=d.worker_count)


def _mark_absl_flags_parsed() -> None:
  """grain worker processes read absl flags; outside ``absl.app.run`` they are unparsed."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
