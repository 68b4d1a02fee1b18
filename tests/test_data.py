"""Data pipelines: determinism, exact resume, sharding, dataset contents, packing, MLM
masking, the TFDS path (mocked) and the errors for bad input."""

import concurrent.futures
import dataclasses
import json
import os
import re

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from xlps import config as config_lib
from xlps import data
from xlps.data import builders, sources, tokenizers

BYTES = tokenizers.ByteTokenizer()


def make_config(data_dir, family="decoder_lm", batch_size=8, seed=0, **data_overrides):
  config = ml_collections.ConfigDict()
  config.seed = seed
  config.model = config_lib.model_config()
  config.model.family = family
  config.data = config_lib.data_config()
  config.data.data_dir = str(data_dir)
  config.data.update(data_overrides)
  config.train = ml_collections.ConfigDict({"batch_size": batch_size})
  return config


SMALL_ALGORITHMIC = dict(name="algorithmic", train_min_len=1, train_max_len=8, test_max_len=12,
                         num_train_examples=300, num_eval_examples=64, seq_len=32)


def write_corpus(root, files, seed, words):
  """Writes ``files`` text files to ``root``, each one document tagged <docNNN> of
  ``words`` = (low, high) random words; returns ``root``."""
  rng = np.random.default_rng(seed)
  for i in range(files):
    text = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"], rng.integers(*words)))
    (root / f"f{i:03d}.txt").write_text(f"<doc{i:03d}> {text}\n")
  return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """A text_files corpus of 41 files."""
  return write_corpus(tmp_path_factory.mktemp("corpus"), 41, seed=0, words=(20, 120))


@pytest.fixture(scope="session")
def eval_corpus(tmp_path_factory):
  """A text_files corpus of 300 small files, 20 of them validation documents."""
  return write_corpus(tmp_path_factory.mktemp("eval_corpus"), 300, seed=1, words=(5, 60))


def eval_overrides(kind, eval_corpus):
  """(data overrides, eval split) of a small packed-text or seq2seq dataset."""
  if kind == "text":
    return dict(name="text_files", glob=str(eval_corpus / "*.txt"), seq_len=32), "validation"
  return SMALL_ALGORITHMIC, "test"


class CountingSource:
  """A record source that remembers the indices read from it."""

  def __init__(self, records):
    self.records, self.read = records, set()

  def __len__(self):
    return len(self.records)

  def __getitem__(self, index):
    self.read.add(int(index))
    return self.records[index]


def count_eval_reads(monkeypatch, source_name):
  """Wraps the eval splits of ``sources.<source_name>`` in CountingSources; returns the list
  of each build's wrapped eval splits."""
  make, built = getattr(sources, source_name), []

  def counting(*args, **kwargs):
    splits = make(*args, **kwargs)
    built.append({k: CountingSource(v) for k, v in splits.evals.items()})
    return dataclasses.replace(splits, evals=built[-1])
  monkeypatch.setattr(sources, source_name, counting)
  return built


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def doc_tags(batch):
  """The <docNNN> tags of the documents that start in a decoder_lm batch."""
  return {int(m) for row in batch["inputs"] for m in re.findall(rb"<doc(\d{3})>",
                                                                 BYTES.decode(row))}


def test_data_config_has_every_key_with_documented_defaults():
  d = config_lib.data_config()
  assert (d.name, d.tokenizer, d.seq_len, d.eval_batches, d.worker_count) == (
      "stdlib", "byte", 128, 8, 0)
  assert (d.train_min_len, d.train_max_len, d.test_max_len) == (1, 20, 40)


def test_stdlib_batches_deterministic_per_seed(data_dir):
  a = take(data.build(make_config(data_dir)).train_iter(), 3)
  b = take(data.build(make_config(data_dir)).train_iter(), 3)
  c = take(data.build(make_config(data_dir, seed=1)).train_iter(), 3)
  assert_same(a, b)
  assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
  for k, v in a[0].items():
    assert v.shape == (8, 128) and v.dtype == (np.float32 if k == "weights" else np.int32)


@pytest.mark.parametrize("family,overrides,skip", [
    # The row shuffle window spans 64 mean stdlib files (~1100 rows of 1024): 150 batches of
    # 8 cross a window boundary.
    ("decoder_lm", dict(seq_len=1024), 150),
    ("encoder_mlm", dict(seq_len=64), 5),
    ("encoder_decoder", SMALL_ALGORITHMIC, 50),  # 50 x 8 > 300 examples: crosses an epoch
])
def test_train_iter_resumes_exactly_after_json_round_trip(data_dir, family, overrides, skip):
  pipeline = data.build(make_config(data_dir, family=family, **overrides))
  it = pipeline.train_iter()
  take(it, skip)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 4)
  resumed = pipeline.train_iter()
  resumed.set_state(state)
  assert_same(take(resumed, 4), expected)


def test_processes_read_disjoint_shards_that_cover_the_train_split(data_dir, corpus):
  glob = str(corpus / "*.txt")
  single = data.build(make_config(data_dir, name="text_files", glob=glob, seq_len=256,
                                  eval_batches=0))
  train_tags = set(range(41)) - set().union(*map(doc_tags, single.eval_batches("validation")))
  seen = []
  for index in range(2):
    pipeline = data.build(make_config(data_dir, name="text_files", glob=glob, seq_len=256),
                          process_index=index, process_count=2)
    seen.append(set().union(*map(doc_tags, take(pipeline.train_iter(), 40))))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] <= train_tags
  assert len(seen[0]) == len(seen[1]) == len(train_tags) // 2  # remainder dropped


def eval_parts(config, split, count):
  """The eval batches of each of ``count`` processes, padded as train._eval does (with
  ``padding_batch(split)`` up to the most batches any process has)."""
  pipelines = [data.build(config, process_index=i, process_count=count) for i in range(count)]
  parts = [list(p.eval_batches(split)) for p in pipelines]
  most = max(map(len, parts))
  return [part + [p.padding_batch(split)] * (most - len(part))
          for p, part in zip(pipelines, parts)]


@pytest.mark.parametrize("family,kind", [("decoder_lm", "text"), ("encoder_mlm", "text"),
                                         ("encoder_decoder", "seq2seq")])
def test_eval_global_batches_do_not_depend_on_the_process_count(data_dir, eval_corpus, family,
                                                                kind):
  overrides, split = eval_overrides(kind, eval_corpus)
  for eval_batches in (0, 3):
    config = make_config(data_dir, family=family, eval_batches=eval_batches, **overrides)
    [whole] = eval_parts(config, split, 1)
    assert (len(whole) == 3) if eval_batches else (len(whole) > 3)
    for count in (2, 4):
      parts = eval_parts(config, split, count)
      assert parts[0][0]["weights"].shape == (8 // count, whole[0]["weights"].shape[1])
      assert_same([{k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
                   for batches in zip(*parts)], whole)
  assert_same(list(data.build(config).eval_batches(split)), whole)  # the same on every call
  with pytest.raises(ValueError, match=rf"eval split 'nope' is unknown; valid: {split}"):
    data.build(config).eval_batches("nope")


@pytest.mark.parametrize("kind", ["text", "seq2seq"])
def test_eval_covers_the_whole_split_once(data_dir, eval_corpus, kind):
  overrides, split = eval_overrides(kind, eval_corpus)
  if kind == "text":  # encoder_mlm: input_mask marks each packed token (BOS text EOS)
    config = make_config(data_dir, family="encoder_mlm", eval_batches=0, **overrides)
    records = sources.text_files(config.data.glob, require_utf8=False).evals[split]
    key, expected, rows = "input_mask", sum(len(r["text"]) + 2 for r in records), None
  else:  # one weighted row per example: its target and EOS
    config = make_config(data_dir, family="encoder_decoder", eval_batches=0, **overrides)
    records = sources.algorithmic(config.data, str(data_dir)).evals[split]
    key, expected, rows = "weights", sum(len(r["target"]) + 1 for r in records), len(records)
  for count in (1, 2, 4):
    batches = [b for part in eval_parts(config, split, count) for b in part]
    assert sum(b[key].sum() for b in batches) == expected, count
    if rows:
      assert sum((b[key].sum(1) > 0).sum() for b in batches) == rows, count


@pytest.mark.parametrize("kind", ["text", "seq2seq"])
def test_each_process_reads_only_its_share_of_the_eval_split(data_dir, eval_corpus, monkeypatch,
                                                             kind):
  overrides, split = eval_overrides(kind, eval_corpus)
  built = count_eval_reads(monkeypatch, "text_files" if kind == "text" else "algorithmic")
  family = "decoder_lm" if kind == "text" else "encoder_decoder"
  for count in (2, 4):
    for index in range(count):
      for eval_batches in (0, 2):
        config = make_config(data_dir, family=family, eval_batches=eval_batches, **overrides)
        list(data.build(config, process_index=index, process_count=count).eval_batches(split))
        source = built[-1][split]
        n = len(source)
        share = set(range(index * n // count, (index + 1) * n // count))
        if eval_batches:  # the first rows of each of its shards
          assert source.read < share and source.read, (count, index)
        else:
          assert source.read == share, (count, index)


def test_eval_pads_exhausted_shards_with_weight_zero_rows(data_dir):
  pipeline = data.build(make_config(data_dir, family="encoder_decoder", batch_size=24,
                                    eval_batches=0, **SMALL_ALGORITHMIC))
  batches = list(pipeline.eval_batches("test"))
  assert len(batches) == 3  # 64 examples in 24 shards of 2 or 3: 16 shards have a third
  assert all(b["inputs"].shape == (24, 9) for b in batches)  # copy, operands <= 8, + EOS
  real = batches[-1]["weights"].sum(1) > 0
  assert real.sum() == 16 and not any(v[~real].any() for v in batches[-1].values())
  padding = pipeline.padding_batch("test")
  assert padding.keys() == batches[0].keys()
  assert all(v.shape == (24, 9) and not v.any() for v in padding.values())


@pytest.mark.parametrize("family,task,want", [
    ("encoder_decoder", "copy", {"train": 9, "test": 9, "test_long": 13}),
    ("encoder_decoder", "addition", {"train": 17, "test": 17, "test_long": 25}),
    ("decoder_lm", "reverse", {"train": 17, "test": 17, "test_long": 25})])
def test_seq2seq_rows_are_as_long_as_their_split_needs(data_dir, family, task, want):
  """Not data.seq_len (sized for the longest test_long example): no training on padding."""
  config = make_config(data_dir, family=family, task=task, eval_batches=1,
                       **{**SMALL_ALGORITHMIC, "seq_len": 64})
  pipeline = data.build(config)
  got = {"train": next(pipeline.train_iter())["inputs"].shape[1]}
  got.update({s: next(pipeline.eval_batches(s))["inputs"].shape[1] for s in ("test", "test_long")})
  assert got == want
  assert want["test_long"] == config_lib.seq2seq_length(
      task, 12, "lm" if family == "decoder_lm" else "seq2seq")


def decode_seq2seq(batch):
  for inputs, targets in zip(batch["inputs"], batch["targets"]):
    if targets.any():
      tokens = list(targets[targets != 0])
      assert tokens[-1] == tokenizers.EOS and tokenizers.EOS not in tokens[:-1]
      yield BYTES.decode(inputs).decode(), BYTES.decode(tokens).decode()


@pytest.mark.parametrize("task", builders.TASKS)
def test_algorithmic_targets_are_correct_and_test_long_is_longer(data_dir, task):
  pipeline = data.build(make_config(data_dir, family="encoder_decoder", task=task,
                                    eval_batches=0, **SMALL_ALGORITHMIC))
  assert pipeline.eval_splits == ("test", "test_long") and pipeline.unigram_entropy is None
  lengths = {}
  for split in ("train", *pipeline.eval_splits):
    batches = (take(pipeline.train_iter(), 10) if split == "train"
               else list(pipeline.eval_batches(split)))
    lengths[split] = []
    for source, target in (pair for b in batches for pair in decode_seq2seq(b)):
      if task == "addition":
        a, b = source.split("+")
        assert int(target) == int(a) + int(b)
        lengths[split].append(max(len(a), len(b)))
      else:
        assert target == (source if task == "copy" else source[::-1])
        lengths[split].append(len(source))
  assert len(lengths["test"]) == len(lengths["test_long"]) == 64
  assert 1 <= min(lengths["train"]) and max(lengths["train"]) <= 8 and max(lengths["test"]) <= 8
  assert min(lengths["test_long"]) >= 9 and max(lengths["test_long"]) <= 12


def test_algorithmic_decoder_lm_weights_only_the_target(data_dir):
  pipeline = data.build(make_config(data_dir, task="reverse", **SMALL_ALGORITHMIC))
  batch = next(pipeline.train_iter())
  for inputs, targets, weights, seg in zip(batch["inputs"], batch["targets"], batch["weights"],
                                           batch["segment_ids"]):
    sep = list(inputs).index(tokenizers.EOS)  # "source EOS target EOS"
    source = BYTES.decode(inputs[:sep]).decode()
    target = targets[weights > 0]
    assert BYTES.decode(target).decode() == source[::-1] and target[-1] == tokenizers.EOS
    assert weights[:sep].sum() == 0 and seg.sum() == 2 * sep + 1
    np.testing.assert_array_equal(inputs[1:seg.sum()], targets[:seg.sum() - 1])


def test_stdlib_splits_are_disjoint_by_file_and_entropy_is_sensible(data_dir):
  builder = builders.prepare(builders.XlpsStdlib, builders.stdlib_config(), str(data_dir))
  paths = {s: {r["path"].decode() for r in builder.as_data_source(split=s)}
           for s in ("train", "validation")}
  assert paths["train"] and paths["validation"] and not paths["train"] & paths["validation"]
  assert paths["train"] | paths["validation"] <= set(builders.stdlib_files())
  assert all(builders.is_validation_file(p) for p in paths["validation"])
  assert not any(p.startswith("test/") or "site-packages" in p for p in paths["train"])
  pipeline = data.build(make_config(data_dir))
  assert 2.0 < pipeline.unigram_entropy < 6.0
  assert pipeline.vocab_size == tokenizers.BYTE_VOCAB_SIZE == 260
  assert "stdlib" in pipeline.describe()


def test_packing_keeps_documents_apart(data_dir):
  batches = take(data.build(make_config(data_dir, seq_len=64, batch_size=16)).train_iter(), 20)
  starts = 0
  for b in batches:
    for inputs, targets, seg, pos, w in zip(b["inputs"], b["targets"], b["segment_ids"],
                                            b["positions"], b["weights"]):
      assert seg[0] == 1 and pos[0] == 0 and np.all(np.diff(seg) >= 0)
      new = np.diff(seg) == 1  # segment boundaries restart the positions
      np.testing.assert_array_equal(pos[1:][new], 0)
      np.testing.assert_array_equal(pos[1:][~new & (seg[1:] > 0)],
                                    pos[:-1][~new & (seg[1:] > 0)] + 1)
      inner = w[:-1] > 0  # a weighted target is the next input of the same segment
      np.testing.assert_array_equal(targets[:-1][inner], inputs[1:][inner])
      assert np.all(seg[1:][inner] == seg[:-1][inner])
      assert w[inputs == tokenizers.EOS].sum() == 0  # EOS is followed by another document
      assert np.all(w[seg == 0] == 0)
      starts += int(np.sum(inputs[pos == 0] == tokenizers.BOS))
  assert starts > 0


def test_mlm_masks_about_15_percent_80_10_10(data_dir):
  pipeline = data.build(make_config(data_dir, family="encoder_mlm", batch_size=64))
  batches = take(pipeline.train_iter(), 8)
  b = {k: np.concatenate([x[k] for x in batches]) for k in batches[0]}
  regular = b["targets"] >= tokenizers.NUM_SPECIAL
  selected = b["weights"] > 0
  assert not np.any(selected & ~regular)
  assert 0.14 < selected.sum() / regular.sum() < 0.16
  kept = b["inputs"] == b["targets"]
  assert np.all(kept[~selected])  # targets are the original ids
  masked = b["inputs"][selected] == tokenizers.MASK
  same = kept[selected]
  assert 0.77 < masked.mean() < 0.83 and 0.08 < same.mean() < 0.12
  assert 0.08 < 1 - masked.mean() - same.mean() < 0.12
  np.testing.assert_array_equal(b["input_mask"], (b["targets"] != 0).astype(np.int32))
  assert not b["token_types"].any() and tokenizers.MASK not in b["targets"]


def test_tfds_named_dataset_via_mock_data(tmp_path):
  with tfds.testing.mock_data(num_examples=64):
    pipeline = data.build(make_config(tmp_path, name="tfds", tfds_name="lm1b", eval_split="test",
                                      seq_len=32))
    batch = next(pipeline.train_iter())
    evals = list(pipeline.eval_batches("test"))
  assert pipeline.eval_splits == ("test",) and "lm1b" in pipeline.describe()
  assert batch["inputs"].shape == (8, 32) and batch["weights"].sum() > 0
  assert evals and evals[0]["inputs"].shape == (8, 32)
  assert 0.5 < pipeline.unigram_entropy < 6.0


def test_text_files_accepts_any_bytes_with_the_byte_tokenizer(data_dir, tmp_path):
  (tmp_path / "a.txt").write_bytes(b"caf\xe9 latin-1 \xff\xfe text\n" * 20)
  pipeline = data.build(make_config(data_dir, name="text_files", glob=str(tmp_path / "*.txt"),
                                    seq_len=16, batch_size=2))
  rows = b"".join(BYTES.decode(r) for r in next(pipeline.train_iter())["inputs"])
  assert b"\xe9" in rows
  assert pipeline.eval_splits == ("validation",) and list(pipeline.eval_batches("validation"))


def test_concurrent_preparation_prepares_once(tmp_path):
  config = builders.AlgorithmicConfig.make("copy", 1, 4, 6, 50, 10)
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    results = list(pool.map(lambda _: builders.prepare(builders.XlpsAlgorithmic, config,
                                                       str(tmp_path)), range(2)))
  assert all(len(b.as_data_source(split="train")) == 50 for b in results)
  assert os.listdir(tmp_path / "xlps_algorithmic" / config.name) == ["1.0.0"]


def test_sentencepiece_trained_on_the_train_split(data_dir, tmp_path):
  pytest.importorskip("sentencepiece", reason="the optional `sentencepiece` package is missing")
  for name in ("json/decoder.py", "json/encoder.py", "json/scanner.py", "textwrap.py",
               "shlex.py", "glob.py", "fnmatch.py"):
    (tmp_path / name.replace("/", "_")).write_bytes((builders.stdlib_root() / name).read_bytes())
  config = make_config(tmp_path / "tfds", name="text_files", glob=str(tmp_path / "*.py"),
                       tokenizer="sentencepiece", sp_vocab_size=400, seq_len=64)
  pipeline = data.build(config)
  assert pipeline.vocab_size == 400 and "sentencepiece" in pipeline.describe()
  assert 2.0 < pipeline.unigram_entropy < np.log(400)
  corpus = b"".join(p.read_bytes() for p in tmp_path.glob("*.py"))
  batch = next(pipeline.train_iter())
  assert 0 < batch["inputs"].max() < 400
  for inputs, seg in zip(batch["inputs"], batch["segment_ids"]):
    for s in set(seg[seg > 0]):  # each segment decodes to a piece of the corpus
      assert pipeline.tokenizer.decode(inputs[seg == s]).strip() in corpus
  models = os.listdir(tmp_path / "tfds" / "xlps_sentencepiece")
  assert len([m for m in models if m.endswith(".model")]) == 1
  assert data.build(config).vocab_size == 400  # reuses the cached model


@pytest.mark.parametrize("overrides,match", [
    (dict(name="text_files", glob="/nonexistent/*.txt"), r"data.glob=.* matched no files"),
    (dict(name="nope"), r"data.name='nope' is not valid; choose one of: stdlib, algorithmic"),
    (dict(name="algorithmic", task="sort"), r"data.task='sort' is not valid.*copy, reverse"),
    (dict(tokenizer="wordpiece"), r"data.tokenizer='wordpiece' is not valid.*byte, sentencepiece"),
    (dict(seqlen=64), r"data.seqlen is not a data key"),
    (dict(seq_len=1), r"data.seq_len=1 must be an integer >= 2"),
    (dict(name="algorithmic", task="addition", seq_len=40),
     r"data.seq_len=40 is too small for task 'addition'.*seq_len >= 123"),
    (dict(name="tfds", tfds_name="lm1b"), r"tfds_name='lm1b' .*could not be read from data_dir"),
    (dict(name="tfds"), r"tfds_name='' is empty"),
    (dict(test_max_len=20), r"data.test_max_len=20 must be an integer >= 21"),
])
def test_bad_data_config_raises_a_clear_value_error(tmp_path, overrides, match):
  with pytest.raises(ValueError, match=match):
    data.build(make_config(tmp_path, **overrides))


def test_bad_batch_size_and_family_raise_clear_value_errors(tmp_path):
  with pytest.raises(ValueError, match=r"batch_size=6 \(global\) is not divisible by "
                                       r"process_count=4"):
    data.build(make_config(tmp_path, batch_size=6), process_index=0, process_count=4)
  with pytest.raises(ValueError, match=r"family='encoder_decoder' does not fit data.name='stdlib'"):
    data.build(make_config(tmp_path, family="encoder_decoder"))


def test_bad_text_files_raise_naming_the_file(tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"")
  with pytest.raises(ValueError, match=r"empty.txt' is empty"):
    data.build(make_config(tmp_path, name="text_files", glob=str(tmp_path / "*.txt")))
  (tmp_path / "empty.txt").unlink()
  (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
  with pytest.raises(ValueError, match=r"latin.txt' is not UTF-8"):
    data.build(make_config(tmp_path, name="text_files", glob=str(tmp_path / "*.txt"),
                           tokenizer="sentencepiece"))


def test_grain_worker_processes_give_the_in_process_stream_and_resume(data_dir):
  config = make_config(data_dir, family="encoder_decoder", **SMALL_ALGORITHMIC)
  expected = take(data.build(config).train_iter(), 6)
  config.data.worker_count = 1
  pipeline = data.build(config)
  it = pipeline.train_iter()
  assert_same(take(it, 3), expected[:3])
  state = json.loads(json.dumps(it.get_state()))
  resumed = pipeline.train_iter()
  resumed.set_state(state)
  assert_same(take(resumed, 3), expected[3:])
  it.close()
  resumed.close()


@pytest.mark.parametrize("family", ["decoder_lm", "encoder_mlm"])
def test_global_batch_depends_on_num_shards_not_on_process_count(data_dir, family):
  # Two processes reading one shard each give, together, exactly the batches of one process
  # reading both shards: a run can resume on a different number of processes unchanged.
  config = make_config(data_dir, family=family, batch_size=8, seq_len=32, num_shards=2)
  single = data.build(config).train_iter()
  parts = [data.build(config, process_index=p, process_count=2).train_iter() for p in (0, 1)]
  for _ in range(3):
    whole = next(single)
    halves = [next(it) for it in parts]
    for key in whole:
      np.testing.assert_array_equal(whole[key], np.concatenate([h[key] for h in halves]))
  with pytest.raises(ValueError, match=r"data.num_shards=3 must be a multiple of "
                     r"process_count=2 that divides train.batch_size=8"):
    data.build(make_config(data_dir, batch_size=8, num_shards=3), process_index=0,
               process_count=2)
