"""grain pipelines from record sources to the batch layouts of the model families.

Training: the process's shard of the train split -> shuffle (a new permutation each epoch,
seeded by ``config.seed``) -> repeat forever -> tokenize -> (text) pack documents into rows
with grain's concat-then-split and window-shuffle the rows (long documents fill many
consecutive rows) -> the layout's features -> batch. Every stage is a grain ``IterDataset``,
so the iterator's state is a small JSON-serialisable dict and resuming is exact.

Evaluation: the eval split's records are cut into a fixed number of contiguous shards (the
largest divisor of the global batch that is at most the number of records), each turned
into rows on its own (text: packed, so packing restarts at every shard boundary; seq2seq:
one row per record). Shard j fills the same rows of every *global* batch with its next
rows, and weight-0 rows once it is exhausted. The global batches depend on the global batch
size only, not on the process count, and cover the split once; each process reads only the
shards behind its own rows (with at least as many records as the global batch: its
contiguous 1/process_count of the split). Processes can run out of rows at different
batches; the caller keeps them in step with ``padding_batch()`` (``train._eval`` does).

Puzzles (``PuzzlePipeline``, layout ``puzzle``): one row per puzzle (no packing), augmented
at train time per position in the stream; evaluation as above on the ``test`` split.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grain
import numpy as np

from xlps.data import puzzles
from xlps.data import tokenizers as tok_lib

_SHUFFLE_WINDOW_DOCS = 64          # packed rows are shuffled in windows of ~this many documents
_SHUFFLE_WINDOW_MAX_TOKENS = 1 << 22  # ... but at most this many tokens (memory, resume time)
_STATS_MAX_DOCS = 20000             # token statistics: at most this many train documents
# Eval reads each shard in the calling thread: a process reads up to global_batch / process_count
# shards at once, and grain's default (16 threads, 500 records ahead) per shard would read far
# past the rows needed.
_EVAL_READ = grain.ReadOptions(num_threads=0)


def shard(ds: grain.MapDataset, index: int, count: int, what: str) -> grain.MapDataset:
  """Process ``index``'s contiguous 1/``count`` of ``ds``; the remainder is dropped so that
  every process has the same number of records (as ShardOptions(drop_remainder=True))."""
  per = len(ds) // count
  if per == 0:
    raise ValueError(f"{what} has {len(ds)} records, fewer than process_count={count}")
  return ds[index * per:(index + 1) * per]


class _JsonSafePackIterator(grain.DatasetIterator):
  """grain's concat-then-split iterator with a state that survives ``json`` round trips.

  Its state holds ``(start, stop)`` tuples and compares them with a tuple sentinel, so
  the lists that JSON gives back silently corrupt the resumed stream (grain 0.2.18).
  """

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    if "remainder_slices" in state:
      state = dict(state, remainder_slices={k: tuple(v)
                                            for k, v in state["remainder_slices"].items()})
    self._parent.set_state(state)


class _PackDataset(grain.IterDataset):
  """Concatenates ``tokens`` of consecutive documents and splits them into rows of ``length``
  (with ``tokens_segment_ids`` from 1 and ``tokens_positions`` restarting per segment)."""

  def __init__(self, parent: grain.IterDataset, length: int):
    super().__init__(parent)
    self._length = length

  def __iter__(self) -> grain.DatasetIterator:
    packed = grain.experimental.ConcatThenSplitIterDataset(
        self._parent, length_struct={"tokens": self._length})
    return _JsonSafePackIterator(packed.__iter__())


def lm_features(row: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Layout ``lm`` (next-token prediction) from a packed row of seq_len + 1 tokens."""
  tokens, seg, pos = row["tokens"], row["tokens_segment_ids"], row["tokens_positions"]
  weights = (seg[1:] == seg[:-1]) & (seg[:-1] > 0)
  return {"inputs": tokens[:-1], "targets": tokens[1:], "segment_ids": seg[:-1],
          "positions": pos[:-1], "weights": weights.astype(np.float32)}


def mlm_features(row: Mapping[str, np.ndarray], rng: np.random.Generator, probability: float,
                 regular_ids: np.ndarray, is_regular: np.ndarray,
                 mask_id: int) -> dict[str, np.ndarray]:
  """Layout ``mlm``, BERT masking of a packed row: each regular (non-special) token is
  selected with ``probability``; selected tokens become ``mask_id`` (80%), a random regular
  token (10%) or stay (10%). ``is_regular`` is the lookup table of ``regular_ids``."""
  tokens = row["tokens"]
  selected = is_regular[tokens] & (rng.random(tokens.shape) < probability)
  action = rng.random(tokens.shape)
  random_ids = regular_ids[rng.integers(0, len(regular_ids), tokens.shape, dtype=np.int32)]
  inputs = np.where(selected & (action < 0.8), mask_id, tokens)
  inputs = np.where(selected & (action >= 0.8) & (action < 0.9), random_ids, inputs)
  return {"inputs": inputs.astype(np.int32),
          "input_mask": (row["tokens_segment_ids"] > 0).astype(np.int32),
          "token_types": np.zeros_like(tokens), "targets": tokens,
          "weights": selected.astype(np.float32)}


def seq2seq_features(source: np.ndarray, target: np.ndarray, layout: str,
                     seq_len: int) -> dict[str, np.ndarray]:
  """Layout ``seq2seq``: 0-padded source / target + EOS; layout ``lm``: ``source EOS target
  EOS`` in one row of seq_len + 1 tokens, shifted, with weights on the target part only."""
  target = np.append(target, tok_lib.EOS).astype(np.int32)
  if layout == "seq2seq":
    inputs, targets = np.zeros((2, seq_len), np.int32)
    inputs[:len(source)], targets[:len(target)] = source, target
    return {"inputs": inputs, "targets": targets, "weights": (targets != 0).astype(np.float32)}
  row = np.zeros(seq_len + 1, np.int32)
  n = len(source) + 1 + len(target)
  row[:n] = np.concatenate([source, [tok_lib.EOS], target])
  steps = np.arange(seq_len)
  segment_ids = (steps < n - 1).astype(np.int32)
  weights = (steps >= len(source)) & (steps < n - 1)
  return {"inputs": row[:-1], "targets": row[1:], "segment_ids": segment_ids,
          "positions": steps.astype(np.int32) * segment_ids, "weights": weights.astype(np.float32)}


def token_statistics(docs: Sequence[Mapping], text_key: str,
                     tokenizer: tok_lib.Tokenizer) -> tuple[float, float]:
  """(entropy in nats/token of the target-token unigram distribution, i.e. document tokens
  + EOS; mean tokens per document) over an evenly spread sample of the documents."""
  counts = np.zeros(tokenizer.vocab_size, np.int64)
  sample = sample_indices(len(docs))
  for i in sample:
    counts += np.bincount(tokenizer.encode(docs[i][text_key]), minlength=tokenizer.vocab_size)
    counts[tokenizer.eos_id] += 1
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum()), float(counts.sum() / len(sample))


def sample_indices(n: int) -> np.ndarray:
  """An evenly spread, deterministic sample of at most ``_STATS_MAX_DOCS`` indices."""
  return np.unique(np.linspace(0, n - 1, min(n, _STATS_MAX_DOCS)).astype(np.int64))


def shuffle_window(mean_doc_tokens: float, seq_len: int, local_batch: int) -> int:
  """Rows per shuffle window: long documents fill many consecutive packed rows, so rows are
  shuffled over about ``_SHUFFLE_WINDOW_DOCS`` documents' worth to mix documents in a batch."""
  tokens = min(_SHUFFLE_WINDOW_DOCS * mean_doc_tokens, _SHUFFLE_WINDOW_MAX_TOKENS)
  return max(local_batch, math.ceil(tokens / seq_len))


class ShardedIterator:
  """Concatenates the batches of several shard iterators; its state is theirs, in order."""

  def __init__(self, iterators: list):
    self._iterators = iterators

  def __iter__(self) -> "ShardedIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(it) for it in self._iterators]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict:
    return {"shards": [it.get_state() for it in self._iterators]}

  def set_state(self, state: dict) -> None:
    if len(state["shards"]) != len(self._iterators):
      raise ValueError(f"the data iterator state has {len(state['shards'])} shards but this "
                       f"process reads {len(self._iterators)}; resume with the same "
                       "data.num_shards / process count")
    for it, s in zip(self._iterators, state["shards"]):
      it.set_state(s)

  def close(self) -> None:
    """Stops grain worker processes, if any."""
    for it in self._iterators:
      if hasattr(it, "close"):
        it.close()


class Pipeline:
  """Batches of one layout (``xlps.families.LAYOUT_DATASETS``) from one dataset, for one
  process of ``process_count``.

  Attributes: ``vocab_size``, ``eval_splits``, ``unigram_entropy`` (text datasets: the
  byte/token-unigram baseline loss in nats/token; None for algorithmic tasks) and
  ``tokenizer`` (``encode`` / ``decode``, e.g. for generation).
  """

  def __init__(self, *, splits, tokenizer, layout: str, seq_len: int, split_lengths=None,
               batch_size: int,
               process_index: int, process_count: int, num_shards: int, seed: int,
               mlm_probability: float,
               eval_batches: int, worker_count: int):
    self._splits = splits
    self.tokenizer = tokenizer
    self._layout = layout
    self._seq_len = seq_len
    # seq2seq rows of a split are as long as its longest example needs (at most seq_len).
    self._split_lengths = dict(split_lengths or {})
    self._global_batch = batch_size
    self._local_batch = batch_size // process_count
    self._process_index = process_index
    self._process_count = process_count
    self._num_shards = num_shards
    per_process = num_shards // process_count
    self._shards = tuple(range(process_index * per_process, (process_index + 1) * per_process))
    self._seed = seed % 2**32
    self._mlm_probability = mlm_probability
    self._eval_batches = eval_batches
    self._worker_count = worker_count
    self.vocab_size: int = tokenizer.vocab_size
    self.eval_splits: tuple[str, ...] = tuple(splits.evals)
    self.unigram_entropy: float | None = None
    self._shuffle_window = 0
    if splits.kind == "text":
      self.unigram_entropy, doc_tokens = token_statistics(splits.train, splits.text_key,
                                                          tokenizer)
      self._shuffle_window = shuffle_window(doc_tokens, seq_len, batch_size // num_shards)

  def _rows(self, ds: grain.MapDataset, read_options: grain.ReadOptions | None = None,
            split: str = "train") -> grain.IterDataset:
    """The layout's features of ``split``, one row (packed sequence or example) per element."""
    # Locals only: the lambdas are pickled into grain worker processes.
    encode, key, layout = self.tokenizer.encode, self._splits.text_key, self._layout
    seq_len = self._split_lengths.get(split, self._seq_len)
    if self._splits.kind == "seq2seq":
      return ds.map(lambda r: seq2seq_features(encode(r["source"]), encode(r["target"]), layout,
                                               seq_len)).to_iter_dataset(read_options)
    bos, eos = self.tokenizer.bos_id, self.tokenizer.eos_id
    docs = ds.map(lambda r: {"tokens": np.concatenate(
        [[bos], encode(r[key]), [eos]]).astype(np.int32)}).to_iter_dataset(read_options)
    if layout == "lm":
      return _PackDataset(docs, seq_len + 1).map(lm_features)
    regular_ids = self.tokenizer.regular_ids
    is_regular = np.zeros(self.tokenizer.vocab_size, bool)
    is_regular[regular_ids] = True
    masking = dict(probability=self._mlm_probability, regular_ids=regular_ids,
                   is_regular=is_regular, mask_id=self.tokenizer.mask_id)
    return _PackDataset(docs, seq_len).random_map(
        lambda row, rng: mlm_features(row, rng, **masking), seed=self._seed)

  def train_iter(self) -> "ShardedIterator":
    """Endless, deterministic, checkpointable (``get_state`` / ``set_state``) batches.

    Each of this process's data shards yields ``batch_size / num_shards`` rows per batch;
    the process's batch is their concatenation in shard order. The global batch therefore
    depends on ``num_shards`` only, not on how many processes read the shards.
    """
    return ShardedIterator([iter(self._shard_batches(s)) for s in self._shards])

  def _shard_batches(self, index: int) -> grain.IterDataset:
    ds = grain.MapDataset.source(self._splits.train)
    ds = shard(ds, index, self._num_shards, "the train split")
    rows = self._rows(ds.shuffle(seed=self._seed).repeat())
    if self._shuffle_window:
      rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=self._shuffle_window,
                                                         seed=self._seed)
    batches = rows.batch(self._global_batch // self._num_shards, drop_remainder=True)
    if self._worker_count:
      # Copy out of the workers' shared memory, which is then released at once (batches kept
      # alive until interpreter exit make grain's shared-memory destructors fail noisily).
      batches = batches.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self._worker_count)).map(
              lambda batch: {k: np.array(v) for k, v in batch.items()})
    return batches

  def eval_records(self, split: str) -> Sequence[Mapping[str, Any]]:
    """The raw records of eval split ``split`` (seq2seq: ``source`` / ``target`` bytes), for
    evaluations that generate instead of scoring batches (``launch.generate``)."""
    if split not in self._splits.evals:
      raise ValueError(f"eval split {split!r} is unknown; valid: {', '.join(self.eval_splits)}")
    return self._splits.evals[split]

  def eval_batches(self, split: str) -> Iterator[dict[str, np.ndarray]]:
    """This process's rows of the first ``data.eval_batches`` global batches of ``split`` (0:
    all), the same on every call and for any process count.

    With S eval shards (see the module docstring) and R = batch_size / S, shard j fills rows
    j*R .. j*R + R - 1 of every global batch with its next R rows (weight-0 once exhausted),
    so ``data.eval_batches`` = k > 0 evaluates the first k*R rows of every shard. A process
    stops when its own shards are exhausted and cannot know when the others' are, so
    processes can yield different numbers of batches: each must feed ``padding_batch()`` to
    the eval step until none has rows left: min(k, ceil(longest shard's rows / R)) batches.
    """
    if split not in self._splits.evals:
      raise ValueError(f"eval split {split!r} is unknown; valid: {', '.join(self.eval_splits)}")
    records = self._splits.evals[split]
    n, size = len(records), self._global_batch
    shards = max(d for d in range(1, size + 1) if size % d == 0 and d <= max(n, 1))
    per = size // shards  # rows of each shard in a global batch
    lo = self._process_index * self._local_batch
    hi = lo + self._local_batch
    ds = grain.MapDataset.source(records)
    streams = {j: iter(self._rows(ds[j * n // shards:(j + 1) * n // shards], _EVAL_READ, split))
               for j in range(lo // per, (hi - 1) // per + 1)}
    return self._local_eval_batches(streams, per, lo, hi, self._padding_row(split))

  def _local_eval_batches(self, streams: dict[int, Iterator[dict]], per: int, lo: int,
                          hi: int, padding: dict) -> Iterator[dict[str, np.ndarray]]:
    for _ in itertools.islice(itertools.count(), self._eval_batches or None):
      rows = {j * per + i: row for j, stream in streams.items()
              for i, row in enumerate(itertools.islice(stream, per))}
      if not rows:
        return
      local = [rows.get(r, padding) for r in range(lo, hi)]
      yield {k: np.stack([row[k] for row in local]) for k in padding}

  def padding_batch(self, split: str = "train") -> dict[str, np.ndarray]:
    """A local batch of weight-0 (all-zero) rows of ``split``'s shape: what a process feeds
    to the eval step after its own eval rows are exhausted, while others still have some."""
    padding = self._padding_row(split)
    return {k: np.stack([v] * self._local_batch) for k, v in padding.items()}

  def _padding_row(self, split: str) -> dict[str, np.ndarray]:
    """All-zero features shaped like ``split``'s rows (those of an empty record)."""
    record = ({"source": b"", "target": b""} if self._splits.kind == "seq2seq"
              else {self._splits.text_key: b""})
    row = next(iter(self._rows(grain.MapDataset.source([record]), _EVAL_READ, split)))
    return {k: np.zeros_like(v) for k, v in row.items()}

  def describe(self) -> str:
    """One line for logs."""
    entropy = ("" if self.unigram_entropy is None else
               f", unigram entropy {self.unigram_entropy:.3f} nats/token")
    return (f"data: {self._splits.summary}; {self.tokenizer.name} tokenizer (vocab "
            f"{self.vocab_size}); {self._layout} seq_len {self._seq_len}; batch "
            f"{self._global_batch} = {self._process_count} x {self._local_batch} (process "
            f"{self._process_index}){entropy}")


def puzzle_features(record: Mapping[str, Any], puzzle: str, size: int,
                    rng: np.random.Generator | None = None) -> dict[str, np.ndarray]:
  """Layout ``puzzle``: ``inputs`` / ``targets`` int32 [L] (puzzle and solution tokens) and
  ``weights`` float32 [L], 1 on every scored cell (Sudoku and mazes: all; ARC: the non-pad
  cells of the output canvas). With ``rng``, the puzzle's random augmentation first."""
  inputs, labels = np.asarray(record["inputs"]), np.asarray(record["labels"])
  if rng is not None and puzzle == "sudoku":
    inputs, labels = puzzles.augment_sudoku(inputs, labels, size, rng)
  elif rng is not None and puzzle == "arc":
    inputs, labels = puzzles.augment_arc(inputs, labels, rng)
  weights = labels != 0 if puzzle == "arc" else np.ones(labels.shape, bool)
  return {"inputs": inputs.astype(np.int32), "targets": labels.astype(np.int32),
          "weights": weights.astype(np.float32)}


class PuzzlePipeline(Pipeline):
  """Batches of layout ``puzzle`` from a puzzle dataset (``sources.Splits`` of kind
  ``puzzle``), for one process of ``process_count``: the same interface, sharding, resume
  and eval semantics as ``Pipeline``.

  Training: the process's shards of the train split, shuffled anew each epoch (seeded by
  ``config.seed``), repeated forever, each example augmented (``augment``) with a generator
  derived from the seed and its position in the stream, so a resumed iterator continues
  exactly. Evaluation: the ``test`` split, never augmented. No tokenizer (``tokenizer`` is
  None) and no unigram baseline (``unigram_entropy`` is None).
  """

  def __init__(self, *, splits, seq_len: int, batch_size: int, process_index: int,
               process_count: int, num_shards: int, seed: int, eval_batches: int,
               augment: bool, worker_count: int = 0):
    if splits.kind != "puzzle":
      raise ValueError(f"PuzzlePipeline needs puzzle splits, not {splits.kind!r}")
    self._splits = splits
    self.tokenizer = None
    self._layout = "puzzle"
    self._seq_len = seq_len
    self._split_lengths = {}
    self._global_batch = batch_size
    self._local_batch = batch_size // process_count
    self._process_index = process_index
    self._process_count = process_count
    self._num_shards = num_shards
    per_process = num_shards // process_count
    self._shards = tuple(range(process_index * per_process, (process_index + 1) * per_process))
    self._seed = seed % 2**32
    self._eval_batches = eval_batches
    self._worker_count = worker_count
    self._augment = augment
    self._shuffle_window = 0
    self.vocab_size: int = splits.vocab_size
    self.eval_splits: tuple[str, ...] = tuple(splits.evals)
    self.unigram_entropy: float | None = None

  def _rows(self, ds: grain.MapDataset, read_options: grain.ReadOptions | None = None,
            split: str = "train") -> grain.IterDataset:
    puzzle, size = self._splits.puzzle, self._splits.puzzle_size  # locals: pickled to workers
    return ds.map(lambda r: puzzle_features(r, puzzle, size)).to_iter_dataset(read_options)

  def _shard_batches(self, index: int) -> grain.IterDataset:
    ds = grain.MapDataset.source(self._splits.train)
    ds = shard(ds, index, self._num_shards, "the train split")
    ds = ds.shuffle(seed=self._seed).repeat()
    puzzle, size = self._splits.puzzle, self._splits.puzzle_size
    if self._augment:
      ds = ds.random_map(lambda r, rng: puzzle_features(r, puzzle, size, rng),
                         seed=self._seed + 1 + index)
    else:
      ds = ds.map(lambda r: puzzle_features(r, puzzle, size))
    batches = ds.to_iter_dataset().batch(self._global_batch // self._num_shards,
                                         drop_remainder=True)
    if self._worker_count:
      batches = batches.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self._worker_count)).map(
              lambda batch: {k: np.array(v) for k, v in batch.items()})
    return batches

  def _padding_row(self, split: str) -> dict[str, np.ndarray]:
    return {"inputs": np.zeros(self._seq_len, np.int32),
            "targets": np.zeros(self._seq_len, np.int32),
            "weights": np.zeros(self._seq_len, np.float32)}

  def describe(self) -> str:
    return (f"data: {self._splits.summary}; {self._splits.puzzle} tokens (vocab "
            f"{self.vocab_size}){', augmented' if self._augment else ''}; puzzle seq_len "
            f"{self._seq_len}; batch {self._global_batch} = {self._process_count} x "
            f"{self._local_batch} (process {self._process_index})")
