"""Tokenizers from files (SentencePiece .model, HF tokenizer.json, HF snapshot directories):
a converted HF model trains on its own tokenizer's ids, a run keeps its tokenizer, and a
tokenizer that disagrees with the model is refused in one line naming both."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is built locally
spm = pytest.importorskip("sentencepiece", reason="the optional `sentencepiece` package")

from xlps import config as config_lib  # noqa: E402
from xlps import data, interop, train  # noqa: E402
from xlps.data import tokenizers  # noqa: E402

from helpers import (HF_ALBERT, ROOT, albert_spiece, corpus_lines, logged_losses,  # noqa: E402
                     small_albert, tiny)


def text_data(config, tmp_path, data_dir) -> None:
  """``config`` reads ``corpus_lines()`` as 40 short text_files documents, small batches, two
  logged steps."""
  lines = corpus_lines()
  for i in range(40):
    (tmp_path / f"doc{i:02d}.txt").write_text("\n".join(lines[5 * i:5 * i + 5]))
  config.data.update(name="text_files", glob=str(tmp_path / "doc*.txt"), data_dir=str(data_dir),
                     seq_len=32, eval_batches=1)
  config.train.update(num_steps=2, batch_size=8, warmup_steps=1, log_every_steps=1,
                      eval_every_steps=2, checkpoint_every_steps=2)


def hf_albert_dir(path, **overrides):
  """A tiny random HF ALBERT (vocab 300) saved to ``path``."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  torch.manual_seed(0)
  transformers.AlbertForMaskedLM(transformers.AlbertConfig(**{**HF_ALBERT, **overrides})
                                 ).save_pretrained(path)
  return path


@pytest.mark.slow
def test_converted_albert_trains_on_its_sentencepiece_ids(tmp_path, data_dir):
  from xlps.interop import huggingface
  hf = hf_albert_dir(tmp_path / "hf")
  model_proto = albert_spiece(hf / "spiece.model")
  sp = spm.SentencePieceProcessor(model_proto=model_proto)
  config, params = huggingface.load_hf(hf)  # the snapshot's own tokenizer
  assert config.data.tokenizer == "file"  # not the preset's byte tokenizer
  assert config.data.tokenizer_path == str(hf)
  text_data(config, tmp_path, data_dir)
  workdir = tmp_path / "wd"
  printed = interop.write_workdir(config, params, workdir)
  assert f"its tokenizer in {workdir / 'tokenizer'}" in printed
  assert (workdir / "tokenizer" / "spiece.model").read_bytes() == model_proto
  shutil.rmtree(hf)  # the workdir is self-contained: its kept copy is the run's tokenizer

  tokenizer = data.run_tokenizer(config, workdir)
  assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id,
          tokenizer.mask_id) == (300, 0, 2, 3, 4)  # <pad>, [CLS], [SEP], [MASK]
  batch = next(data.build(config, tokenizer=tokenizer).train_iter())
  corpus = " ".join(" ".join(corpus_lines()).split())  # SentencePiece folds whitespace
  targets, inputs = batch["targets"], batch["inputs"]
  assert targets.max() < 300 and (targets[batch["input_mask"] == 1] != 0).all()
  assert (targets == 2).any() and (targets == 3).any()  # documents are [CLS] ... [SEP]
  assert set(np.unique(inputs[batch["weights"] > 0])) - set(np.unique(targets)) <= set(
      range(5, 300)) | {4}  # masked: [MASK] or a regular piece, never another special
  assert (inputs[(batch["weights"] > 0) & (inputs != targets)] != 1).all()
  for row in targets:  # every document piece is SentencePiece text of the corpus
    pieces = np.split(row, np.flatnonzero(np.isin(row, (0, 2, 3))))
    for piece in pieces:
      text = sp.decode([int(i) for i in piece if i not in (0, 2, 3)])
      assert " ".join(text.split()) in corpus, text

  result = train.train_and_evaluate(config, workdir)
  assert result["step"] == 2 and sorted(logged_losses(workdir)) == [1, 2]
  assert np.isfinite(result["last_eval"]["eval_loss"])


def test_tokenizer_and_model_mismatch_is_one_line_naming_both(tmp_path, data_dir):
  from xlps.interop import huggingface
  hf = hf_albert_dir(tmp_path / "hf")
  albert_spiece(tmp_path / "big.model", vocab_size=320)
  with pytest.raises(config_lib.ConfigError) as error:
    huggingface.load_hf(hf, tokenizer=tmp_path / "big.model")
  message = str(error.value)
  assert "\n" not in message and f"{tmp_path / 'big.model'}" in message
  assert "vocab 320" in message and f"HF model {hf}: vocab_size=300 (tokenizer: 320)" in message

  albert_spiece(tmp_path / "moved.model", controls=("[MASK]", "[CLS]", "[SEP]"))
  with pytest.raises(config_lib.ConfigError, match=r"bos_token_id=2 \(tokenizer: 3\), "
                     r"eos_token_id=3 \(tokenizer: 4\)"):
    huggingface.load_hf(hf, tokenizer=tmp_path / "moved.model")

  # At training time: a tokenizer file must be the model's exact vocabulary.
  config = small_albert()
  text_data(config, tmp_path, data_dir)
  config.data.update(tokenizer="file", tokenizer_path=str(tmp_path / "big.model"))
  with pytest.raises(config_lib.ConfigError) as error:
    train.train_and_evaluate(config, tmp_path / "wd")
  message = str(error.value)
  assert "\n" not in message and message.startswith(
      f"the tokenizer {tmp_path / 'big.model'} (sentencepiece, vocab 320; pad 0, bos 2, eos "
      "3, mask 4) does not match the model: model.vocab_size=300")

  # A workdir's kept tokenizer against another one in the config.
  albert_spiece(tmp_path / "spiece.model")
  config.data.tokenizer_path = str(tmp_path / "spiece.model")
  data.keep_tokenizer(tokenizers.load(tmp_path / "moved.model"), tmp_path / "wd")
  with pytest.raises(config_lib.ConfigError) as error:
    train.train_and_evaluate(config, tmp_path / "wd")
  message = str(error.value)
  assert "\n" not in message
  assert f"(sentencepiece, vocab 300; pad 0, bos 2, eos 3, mask 4) differs from" in message
  assert f"kept in {tmp_path / 'wd' / 'tokenizer'}: " in message
  assert "(sentencepiece, vocab 300; pad 0, bos 3, eos 4, mask 2)" in message
  config.data.update(tokenizer="byte", tokenizer_path="")
  with pytest.raises(config_lib.ConfigError, match=r"^data.tokenizer='byte' differs from the "
                     r"tokenizer this run's model was trained with"):
    train.train_and_evaluate(config, tmp_path / "wd")
  assert not (tmp_path / "wd" / "checkpoints").exists()  # refused before any work


def test_save_hf_writes_the_tokenizers_special_ids(tmp_path):
  from xlps.interop import huggingface
  hf = hf_albert_dir(tmp_path / "hf")
  albert_spiece(hf / "spiece.model")
  config, params = huggingface.load_hf(hf)
  huggingface.save_hf(config, params, tmp_path / "out")
  saved = json.loads((tmp_path / "out" / "config.json").read_text())
  assert (saved["pad_token_id"], saved["bos_token_id"], saved["eos_token_id"]) == (0, 2, 3)
  assert (tmp_path / "out" / "spiece.model").read_bytes() == (hf / "spiece.model").read_bytes()
  config2, _ = huggingface.load_hf(tmp_path / "out")  # the exported directory has its tokenizer
  assert config2.data.tokenizer_path == str(tmp_path / "out")

  config.data.update(tokenizer="byte", tokenizer_path="")  # a byte model: xlps's own ids
  huggingface.save_hf(config, params, tmp_path / "byte")
  saved = json.loads((tmp_path / "byte" / "config.json").read_text())
  assert (saved["pad_token_id"], saved["bos_token_id"], saved["eos_token_id"]) == (0, 1, 2)
  config.data.update(tokenizer="file", tokenizer_path="")  # converted without a tokenizer
  huggingface.save_hf(config, params, tmp_path / "unknown")
  saved = json.loads((tmp_path / "unknown" / "config.json").read_text())
  assert (saved["pad_token_id"], saved["bos_token_id"], saved["eos_token_id"]) == (None,) * 3


def wordpiece_json(path) -> "object":
  """A tiny WordPiece ``tokenizer.json`` (BERT's special tokens at 0..4) via ``tokenizers``."""
  hf_tokenizers = pytest.importorskip("tokenizers")
  specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  tok = hf_tokenizers.Tokenizer(hf_tokenizers.models.WordPiece(unk_token="[UNK]"))
  tok.pre_tokenizer = hf_tokenizers.pre_tokenizers.BertPreTokenizer()
  tok.decoder = hf_tokenizers.decoders.WordPiece()
  tok.train_from_iterator(corpus_lines(), hf_tokenizers.trainers.WordPieceTrainer(
      vocab_size=200, special_tokens=specials, show_progress=False))
  tok.save(str(path))
  return tok


def test_tokenizer_json_and_snapshot_directories_load(tmp_path, data_dir):
  theirs = wordpiece_json(tmp_path / "tokenizer.json")
  ours = tokenizers.load(tmp_path / "tokenizer.json")
  assert (ours.pad_id, ours.bos_id, ours.eos_id, ours.mask_id) == (0, 2, 3, 4)
  text = "def wrap(text, width=70):"
  assert ours.encode(text).tolist() == theirs.encode(text, add_special_tokens=False).ids
  assert ours.decode([2, *ours.encode(text), 3]) == theirs.decode(
      theirs.encode(text, add_special_tokens=False).ids).encode()

  snapshot = tmp_path / "snapshot"  # names the roles itself: BOS / EOS as RoBERTa would
  snapshot.mkdir()
  shutil.copy(tmp_path / "tokenizer.json", snapshot)
  (snapshot / "special_tokens_map.json").write_text(json.dumps(
      {"bos_token": "[SEP]", "eos_token": {"content": "[CLS]"}, "pad_token": "[PAD]",
       "mask_token": "[MASK]", "unk_token": "[UNK]"}))
  from_dir = tokenizers.load(snapshot)
  assert (from_dir.bos_id, from_dir.eos_id) == (3, 2)
  from_dir.save(tmp_path / "kept")
  assert tokenizers.load(tmp_path / "kept").fingerprint == from_dir.fingerprint
  assert from_dir.fingerprint != ours.fingerprint

  config = small_albert(vocab_size=ours.vocab_size)  # encoder_mlm on WordPiece ids
  text_data(config, tmp_path, data_dir)
  config.data.update(tokenizer="file", tokenizer_path=str(tmp_path / "tokenizer.json"))
  batch = next(data.build(config).train_iter())
  masked = batch["weights"] > 0
  assert (batch["inputs"][masked & (batch["inputs"] != batch["targets"])] != 1).all()
  assert not np.isin(batch["targets"][masked], (0, 1, 2, 3, 4)).any()  # specials never masked
  assert (batch["targets"][batch["input_mask"] == 1] != 0).all()


@pytest.mark.parametrize("overrides, match", [
    (dict(tokenizer="file"), r"^data.tokenizer='file' needs data.tokenizer_path \(it is ''\); "
                             r"valid: a SentencePiece .model file"),
    (dict(tokenizer="file", tokenizer_path="/nonexistent/spiece.model"),
     r"^data.tokenizer_path='/nonexistent/spiece.model' does not exist; valid: a SentencePiece"),
    (dict(tokenizer_path="/x/spiece.model"), r"^data.tokenizer_path='/x/spiece.model' is only "
                                             r"read with data.tokenizer='file' \(not 'byte'\)"),
    (dict(tokenizer="file", tokenizer_path="EMPTY_DIR"), r"is a directory without "
                                                         r"tokenizer.json or exactly one"),
    (dict(tokenizer="file", tokenizer_path="NOT_A_MODEL"), r"is not a SentencePiece model"),
])
def test_bad_tokenizer_files_name_the_field(overrides, match, tmp_path, data_dir):
  (tmp_path / "empty").mkdir()
  (tmp_path / "junk.model").write_bytes(b"not a model")
  paths = {"EMPTY_DIR": str(tmp_path / "empty"), "NOT_A_MODEL": str(tmp_path / "junk.model")}
  config = config_lib.base_config()
  config.model = tiny(max_len=32, vocab_size=300)
  text_data(config, tmp_path, data_dir)
  config.data.update({k: paths.get(v, v) for k, v in overrides.items()})
  with pytest.raises(config_lib.ConfigError, match=match) as error:
    config_lib.validate(config)
    data.build(config)
  assert "\n" not in str(error.value)


@pytest.mark.slow
def test_generate_uses_the_runs_kept_tokenizer(tmp_path, data_dir):
  """A decoder LM trained on a tokenizer file generates through the workdir's copy, with the
  tokenizer's BOS (here [CLS] = 2), after the original file is gone."""
  albert_spiece(tmp_path / "spiece.model")
  config = config_lib.base_config()
  config.model = tiny(max_len=32, vocab_size=300, num_layers=2)
  text_data(config, tmp_path, data_dir)
  config.data.update(tokenizer="file", tokenizer_path=str(tmp_path / "spiece.model"))
  config.train.num_steps, config.train.warmup_steps = 1, 0
  train.train_and_evaluate(config, tmp_path / "wd")
  os.remove(tmp_path / "spiece.model")
  kept = data.run_tokenizer(config, tmp_path / "wd")
  assert kept.source == str(tmp_path / "wd" / "tokenizer" / "spiece.model")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run([sys.executable, "-m", "launch.generate", f"--workdir={tmp_path / 'wd'}",
                        "--prompt=def wrap(", "--max_new_tokens=4"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "--- prompt: 'def wrap('" in out.stdout
