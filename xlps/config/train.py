"""The train section: every training key with its default, ``check_train``, and
``eval_iterations`` (the core iterations a looped model is also evaluated at)."""

from __future__ import annotations

import ml_collections

from xlps.config.checks import (ConfigError, check_bool, check_choice, check_int, check_number,
                                check_keys, check_str)
from xlps.config.model import ModelSpec


NONFINITE = ("stop", "skip")
ON_MISMATCH = ("refuse", "restart")


LOSSES = ("softmax_cross_entropy", "stablemax_cross_entropy")


def train_config() -> ml_collections.ConfigDict:
  """Every training key with its default."""
  t = ml_collections.ConfigDict()
  t.num_steps = 1000               # total optimizer steps (extend to continue a finished run
                                   # on its schedule: past its end at the final rate)
  t.batch_size = 32                # global batch size (examples)
  t.learning_rate = 1e-3           # peak learning rate
  t.warmup_steps = 100             # linear warmup steps (< num_steps unless decay_steps is set)
  t.end_lr_factor = 0.1            # cosine decays to learning_rate * end_lr_factor
  t.decay_steps = 0                # length of warmup + cosine; 0 = num_steps of the run's first
                                   # start (a resumed run keeps the schedule it started with)
  t.weight_decay = 0.01            # AdamW decoupled weight decay (kernels and embeddings only)
  t.b1 = 0.9                       # Adam beta1
  t.b2 = 0.98                      # Adam beta2
  t.grad_clip_norm = 1.0           # global-norm clipping; 0 = off
  t.loss = "softmax_cross_entropy"  # softmax_cross_entropy | stablemax_cross_entropy (Prieto
                                   # et al. 2025; TRM's option for small puzzle data)
  t.ema_decay = 0.0                # evaluate an exponential moving average of the parameters
                                   # (kept in the optimizer state; TRM: 0.999); 0 = off
  t.log_every_steps = 50           # progress line + metrics.jsonl train entry (and at the end)
  t.eval_every_steps = 500         # evaluation on every eval split (and at the end)
  t.eval_iterations = ""           # looped models: also evaluate at these core iterations,
                                   # e.g. "1,2,4,8" (eval_loss_iter4, ...); "" = none
  t.checkpoint_every_steps = 500   # checkpoint interval (and at the end / on SIGTERM)
  t.keep_checkpoints = 3           # the newest checkpoints kept (older ones deleted) ...
  t.keep_every_steps = 0           # ... plus every checkpoint whose step is a multiple of this
                                   # (0 = none), MaxText-style preservation
  t.async_checkpoints = True       # save in the background while training continues
  t.peak_flops_per_device = 0.0    # for MFU; 0 = by device kind (CPU: measured matmul peak)
  t.nonfinite = "stop"             # NaN/Inf loss or gradients: stop (exit non-zero, nothing
                                   # saved) | skip (drop that update, count it in the logs)
  t.on_mismatch = "refuse"         # the workdir's checkpoints hold another model: refuse
                                   # (name the differing fields) | restart (move them aside,
                                   # start at step 0)
  return t


def eval_iterations(t: ml_collections.ConfigDict, spec: ModelSpec) -> tuple[int, ...]:
  """``train.eval_iterations`` parsed: core iterations the eval loop reports loss at."""
  text = t.eval_iterations
  check_str("train.eval_iterations", text)
  if not text.strip():
    return ()
  try:
    values = tuple(int(v) for v in text.replace(",", " ").split())
  except ValueError:
    raise ConfigError(f"train.eval_iterations={text!r} is not a list of integers, e.g. "
                      "'1,2,4,8'") from None
  if spec.loop is None:
    raise ConfigError(f"train.eval_iterations={text!r} needs a looped model "
                      "(model.loop.core > 0)")
  most = spec.loop.max_iterations
  if any(not 1 <= v <= most for v in values):
    raise ConfigError(f"train.eval_iterations={text!r}: each must be in 1..{most} (the "
                      f"iterations model.num_layers={spec.num_layers} holds)")
  return values


def check_train(t: ml_collections.ConfigDict) -> None:
  check_keys(t, "train", tuple(train_config()), "train")
  for key in ("num_steps", "batch_size", "log_every_steps", "eval_every_steps",
              "checkpoint_every_steps", "keep_checkpoints"):
    check_int(f"train.{key}", t[key], 1)
  for key in ("warmup_steps", "decay_steps", "keep_every_steps"):
    check_int(f"train.{key}", t[key], 0)
  check_choice("train.nonfinite", t.nonfinite, NONFINITE)
  check_choice("train.on_mismatch", t.on_mismatch, ON_MISMATCH)
  if (isinstance(t.learning_rate, bool) or not isinstance(t.learning_rate, (int, float))
      or t.learning_rate <= 0):
    raise ConfigError(f"train.learning_rate={t.learning_rate!r} must be a number > 0")
  check_bool("train.async_checkpoints", t.async_checkpoints)
  check_number("train.end_lr_factor", t.end_lr_factor, 0, 1)
  check_number("train.weight_decay", t.weight_decay, 0)
  check_number("train.grad_clip_norm", t.grad_clip_norm, 0)
  check_choice("train.loss", t.loss, LOSSES)
  check_number("train.ema_decay", t.ema_decay, 0, 1, open_hi=True)
  check_number("train.peak_flops_per_device", t.peak_flops_per_device, 0)
  for key in ("b1", "b2"):
    check_number(f"train.{key}", t[key], 0, 1, open_hi=True)
  if not t.decay_steps and t.warmup_steps >= t.num_steps:
    raise ConfigError(
        f"train.warmup_steps={t.warmup_steps} >= train.num_steps={t.num_steps}: the run ends "
        f"inside its warmup and the learning rate never reaches learning_rate="
        f"{t.learning_rate}; valid: warmup_steps < num_steps, or ask for it explicitly by "
        "setting train.decay_steps (the schedule's length: the run stops after num_steps of "
        "its updates)")
