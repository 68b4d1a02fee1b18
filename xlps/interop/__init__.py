"""Interoperability: other libraries' checkpoints to and from xlps.

``xlps.interop.huggingface`` converts ``transformers`` ALBERT / BERT models. The helpers
here write converted parameters as an xlps training checkpoint (step 0, fresh optimizer
state, empty data state) and read a checkpoint's parameters back.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from xlps import checkpoint as checkpoint_lib
from xlps import config as config_lib
from xlps import data as data_lib
from xlps import models
from xlps import train as train_lib
from xlps.data import tokenizers as tok_lib

# The data iterator state of a converted checkpoint: empty, which the trainer reads as
# "start the data afresh" (``train_and_evaluate`` skips ``set_state`` for a falsy state).
FRESH_DATA_STATE: dict = {}


def write_checkpoint(config: ml_collections.ConfigDict, params: Any,
                     workdir: str | os.PathLike) -> epath.Path:
  """Saves ``params`` as step 0 of ``WORKDIR/checkpoints`` for ``train_and_evaluate``.

  The state is the trainer's own step 0 (``train.state_of``: fresh optimizer moments, the
  dropout key of ``config.seed``). Returns the checkpoint directory.
  """
  spec = config_lib.validate(config)
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = train_lib.state_of(params, train_lib.make_optimizer(config.train), config.seed)
  metadata = train_lib.checkpoint_metadata(config, spec, models.summarize(spec))
  ckpt = checkpoint_lib.Checkpointer(train_lib.workdir_path(workdir) / "checkpoints", async_save=False)
  try:
    if ckpt.latest_step() is not None:
      raise ValueError(f"{ckpt.directory} already holds checkpoints (steps "
                       f"{ckpt.all_steps()}); convert into an empty workdir")
    ckpt.save(0, state, FRESH_DATA_STATE, metadata)
  finally:
    ckpt.close()
  return ckpt.directory


def check_new_workdir(workdir: str | os.PathLike) -> epath.Path:
  """``workdir`` as a path, or a one-line ConfigError unless it is new or an empty directory:
  converting into a run's workdir would mix two runs (checked before any loading)."""
  path = train_lib.workdir_path(workdir)
  if path.exists():
    held = sorted(p.name for p in path.iterdir()) if path.is_dir() else None
    if held is None or held:
      what = "is a file" if held is None else f"is not empty (it holds {', '.join(held[:4])}" + (
          ", ..." if len(held) > 4 else "") + ")"
      raise config_lib.ConfigError(f"--workdir={os.fspath(workdir)!r} {what}; valid: a new or "
                                   "empty directory to write the converted step-0 checkpoint to")
  return path


def write_workdir(config: ml_collections.ConfigDict, params: Any,
                  workdir: str | os.PathLike) -> str:
  """``write_checkpoint`` plus ``WORKDIR/config.json`` and, for ``data.tokenizer='file'``, a
  copy of the tokenizer in ``WORKDIR/tokenizer`` (checked against the model first); returns
  the ``launch.train`` command that trains on from it (run from the repository root;
  ``configs/workdir.py`` reads the file)."""
  workdir = train_lib.workdir_path(workdir)
  tokenizer = None
  if config.data.tokenizer == "file" and config.data.tokenizer_path:
    tokenizer = tok_lib.load(config.data.tokenizer_path)
    data_lib.check_tokenizer(config, tokenizer)
  directory = write_checkpoint(config, params, workdir)
  if tokenizer is not None:
    data_lib.keep_tokenizer(tokenizer, workdir)
  (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
  command = shlex.join(["python", "-m", "launch.train",
                        f"--config=configs/workdir.py:{workdir}", f"--workdir={workdir}"])
  kept = (f", its tokenizer in {workdir / data_lib.KEPT_TOKENIZER}" if tokenizer is not None
          else "")
  missing = ("\nno tokenizer was given: add --config.data.tokenizer_path=PATH (the model's own "
             "tokenizer) to train it" if config.data.tokenizer == "file" and tokenizer is None
             else "")
  return (f"wrote {directory} (step 0){kept} and {workdir / 'config.json'}; train it "
          f"with:\n{command}{missing}")


def read_checkpoint(workdir: str | os.PathLike,
                    step: int | None = None) -> tuple[ml_collections.ConfigDict, Any, int]:
  """``(config, params, step)`` of a checkpoint in ``WORKDIR/checkpoints`` (default: the
  newest intact one).

  Checkpoints are checked as training checks them (files, checksums, NaN/Inf): without
  ``step`` a damaged newer one is reported and left in place and the previous one is read;
  a damaged ``step`` raises ``CheckpointError``. The config is the one stored in the
  checkpoint's metadata, set onto today's schema (keys added since it was saved take their
  defaults); params are a tree of dicts on one device, whatever topology saved them.
  """
  ckpt = checkpoint_lib.Checkpointer(train_lib.workdir_path(workdir) / "checkpoints", async_save=False)
  try:
    if step is None:
      newest = ckpt.restore_latest(None, move_aside=False)
      if newest is None:
        raise ValueError(f"{ckpt.directory} holds no checkpoint")
      step, state, _, metadata = newest
    else:
      state, _, metadata = ckpt.restore_checked(step)
  finally:
    ckpt.close()
  return config_lib.from_saved(metadata["config"]), state["params"], step
