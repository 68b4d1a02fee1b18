"""Random-access record sources per ``data.name``, before tokenization.

Text sources yield records with a text feature (str or bytes: one document each);
seq2seq sources yield ``{"source", "target"}`` byte strings. Every source is a sequence
(``len`` + ``__getitem__``) so grain can shard and shuffle it by index.
"""

from __future__ import annotations

import dataclasses
import glob as glob_lib
import hashlib
import os
import platform
from collections.abc import Mapping, Sequence

import tensorflow_datasets as tfds

from xlps.config import ConfigError
from xlps.data import builders


@dataclasses.dataclass(frozen=True)
class Splits:
  """The train split and the eval splits of one dataset."""

  kind: str                          # "text" | "seq2seq"
  train: Sequence[Mapping]
  evals: dict[str, Sequence[Mapping]]
  text_key: str                      # text: the feature holding a document
  cache_key: str                     # identifies the train split (tokenizer cache names)
  summary: str                       # for Pipeline.describe()


def algorithmic(d, data_dir: str) -> Splits:
  """The prepared (on first use) algorithmic task of ``config.data``."""
  config = builders.AlgorithmicConfig.make(
      d.task, d.train_min_len, d.train_max_len, d.test_max_len, d.num_train_examples,
      d.num_eval_examples)
  builder = builders.prepare(builders.XlpsAlgorithmic, config, data_dir)
  read = lambda split: builder.as_data_source(split=split)  # noqa: E731
  return Splits(kind="seq2seq", train=read("train"),
                evals={"test": read("test"), "test_long": read("test_long")}, text_key="",
                cache_key=config.name,
                summary=(f"algorithmic/{d.task} (train lengths {d.train_min_len}..{d.train_max_len}"
                         f", test_long {d.train_max_len + 1}..{d.test_max_len})"))


def stdlib(data_dir: str) -> Splits:
  """The running Python's standard library sources (prepared on first use)."""
  builder = builders.prepare(builders.XlpsStdlib, builders.stdlib_config(), data_dir)
  train, val = (builder.as_data_source(split=s) for s in ("train", "validation"))
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
  paths = sorted(p for p in glob_lib.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(p))
  if not pattern or not paths:
    raise ConfigError(f"data.glob={pattern!r} matched no files; give a glob of your text "
                      "files, e.g. '~/corpus/**/*.txt' (with data.name='text_files')")
  texts = {}
  for path in paths:
    with open(path, "rb") as f:
      data = f.read()
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
      return tfds.data_source(d.tfds_name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # TFDS raises many types here (not found, wrong format, bad split)
      raise ConfigError(
          f"data.tfds_name={d.tfds_name!r} split {split!r} could not be read from "
          f"data_dir {data_dir!r} ({type(e).__name__}: {str(e).splitlines()[0]}). Prepare it there "
          "as array_record first, e.g. tfds.builder(name, data_dir=...).download_and_prepare("
          "file_format='array_record') or `tfds build NAME --data_dir=DIR "
          "--file_format=array_record`, and check data.train_split / data.eval_split") from None

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
