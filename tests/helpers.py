"""Shared test helpers: small configs, launch.train command lines, logged metrics."""

import json
import pathlib
import subprocess
import sys

import ml_collections

from configs import albert
from xlps import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Sizes of the small HF BERT and ALBERT test models.
HF_SMALL = dict(vocab_size=300, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                num_hidden_layers=4, max_position_embeddings=64)
HF_ALBERT = {**HF_SMALL, "embedding_size": 16}


def configure(model: ml_collections.ConfigDict, **overrides) -> ml_collections.ConfigDict:
  """Sets ``overrides`` on the model config ``model`` (in place) and returns it.

  ``sharing={"num_unique": 2, "mlp": {"num_unique": 3}}`` sets plan keys; a dict value
  overrides that component's plan. ``kv_sharing={"policy": "cross_layer", ...}`` sets K/V
  plan keys.
  """
  sharing = overrides.pop("sharing", {})
  model.kv_sharing.update(overrides.pop("kv_sharing", {}))
  for key, value in overrides.items():
    model[key] = value
  for key, value in sharing.items():
    if isinstance(value, dict):
      model.sharing[key].update(value)
    else:
      model.sharing[key] = value
  return model


def tiny(family: str = "decoder_lm", num_layers: int = 6, **overrides) -> ml_collections.ConfigDict:
  """A tiny model config (vocab 32, d_model 16, 4 heads, d_ff 32, seq 8) with overrides."""
  sizes = dict(vocab_size=32, d_model=16, num_heads=4, d_ff=32, max_len=8)
  return configure(config_lib.model_config(), family=family, num_layers=num_layers,
                   **{**sizes, **overrides})


def small_albert(**overrides) -> ml_collections.ConfigDict:
  """configs/albert.py:base at the sizes of ``HF_ALBERT``, with model ``overrides``."""
  config = albert.get_config("base")
  sizes = dict(vocab_size=300, embed_dim=16, d_model=32, num_heads=4, d_ff=64, num_layers=4,
               max_len=64)
  configure(config.model, **{**sizes, **overrides})
  return config


def launch_train(workdir, *flags: str, config: str = "configs/default.py:runlocal") -> list[str]:
  """The ``python -m launch.train`` command line for ``config`` and ``workdir``, then ``flags``."""
  return [sys.executable, "-m", "launch.train", f"--config={config}", f"--workdir={workdir}",
          *flags]


def short_run(workdir, data_dir, steps: int, overrides: dict | None = None,
              config: str = "configs/default.py:runlocal") -> list[str]:
  """``launch_train`` of a short CPU run of ``config``: batch 8 x 32 tokens, dropout 0.1, a
  log line every step, a checkpoint every 2, one evaluation at the end; ``overrides`` maps
  dotted config keys to values."""
  keys = {"data.data_dir": data_dir, "data.seq_len": 32, "model.max_len": 32,
          "data.eval_batches": 2, "train.num_steps": steps, "train.decay_steps": steps,
          "train.batch_size": 8, "train.log_every_steps": 1, "train.checkpoint_every_steps": 2,
          "train.eval_every_steps": steps, "model.dropout_rate": 0.1, **(overrides or {})}
  return launch_train(workdir, *(f"--config.{key}={value}" for key, value in keys.items()),
                      config=config)


def run_command(args: list, timeout: int = 600, **kwargs) -> subprocess.CompletedProcess:
  """Runs ``args`` in the repository root and waits; stdout and stderr are captured as text."""
  return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout, **kwargs)


def logged_losses(workdir) -> dict[int, float]:
  """step -> train_loss from metrics.jsonl, the last record of each step (a restarted run
  re-logs the steps after its last checkpoint)."""
  out = {}
  for record in records(workdir):
    if "train_loss" in record:
      out[record["step"]] = record["train_loss"]
  return out


def records(workdir) -> list[dict]:
  """Every record of metrics.jsonl in order."""
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [json.loads(line) for line in lines]


def tensorboard_steps(workdir) -> dict[str, list[int]]:
  """Tag -> the steps of its scalars, in order, over every TensorBoard event file."""
  from tensorboardX.proto import event_pb2
  steps: dict[str, list[int]] = {}
  for path in sorted((pathlib.Path(workdir) / "tensorboard").iterdir()):
    data, offset = path.read_bytes(), 0
    while offset < len(data):  # TFRecord: u64 length, u32 crc, payload, u32 crc
      length = int.from_bytes(data[offset:offset + 8], "little")
      event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
      offset += 16 + length
      for value in event.summary.value:
        steps.setdefault(value.tag, []).append(event.step)
  return steps


# A small UTF-8 corpus from the running Python's standard library (for tokenizer tests).
CORPUS_FILES = ("textwrap.py", "shlex.py", "glob.py")


def corpus_lines() -> list[str]:
  """The non-empty lines of ``CORPUS_FILES``."""
  from xlps.data import builders
  return [line for name in CORPUS_FILES
          for line in (builders.stdlib_root() / name).read_text().splitlines() if line]


def albert_spiece(path, vocab_size: int = HF_ALBERT["vocab_size"],
                  controls=("[CLS]", "[SEP]", "[MASK]")) -> bytes:
  """Writes an ALBERT-style SentencePiece model to ``path`` and returns its bytes: <pad> 0,
  <unk> 1, then ``controls`` (2, 3, 4), trained on ``corpus_lines()``."""
  import io

  import sentencepiece as spm
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus_lines()), model_writer=model, vocab_size=vocab_size,
      model_type="unigram", pad_id=0, unk_id=1, bos_id=-1, eos_id=-1,
      control_symbols=list(controls), minloglevel=2)
  pathlib.Path(path).write_bytes(model.getvalue())
  return model.getvalue()
