"""Training: ``train_and_evaluate(config, workdir)`` and the pure, jitted steps.

Resuming is automatic: the same command on the same workdir continues from the last
checkpoint (params, optimizer state, step, RNG key and data iterator state), and a larger
``--config.train.num_steps`` trains on from there on the learning-rate schedule the run
started with (``schedule_horizon``). Dropout keys are
``fold_in(rng, step)``, so a resumed run draws exactly the masks of an uninterrupted one, and
a checkpoint keeps the metric sums of its unfinished logging window (``window_metadata``), so
a resumed run logs exactly the rows of an uninterrupted one.
SIGTERM saves a checkpoint at the current step and returns cleanly.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import itertools
import json
import math
import os
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from xlps import checkpoint as checkpoint_lib
from xlps import config as config_lib
from xlps import data as data_lib
from xlps import distributed
from xlps import families
from xlps import metrics as metrics_lib
from xlps import models
from xlps import partitioning
from xlps import storage
from xlps import workdir_lock
from xlps.models import controllers, losses
from xlps.config import ConfigError, ModelSpec


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; checkpointed as one pytree."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


# Weight decay by what a parameter is (its leaf name), never by its rank: stacked slots
# make biases and norm scales (M, d) and attention biases are (heads, head_dim). As in
# BERT and HF's Trainer (no decay on biases and LayerNorm parameters), kernels and
# embeddings decay, biases and norm scales / biases do not. LoRA factors decay like the
# kernels they adapt (as HF's Trainer does with peft), their bias offsets do not.
DECAYED_LEAVES = {"kernel": True, "embedding": True, "position_embedding": True,
                  "type_embedding": True, "bias": False, "scale": False,
                  "lora_a": True, "lora_b": True, "lora_bias": False}


def decay_mask(params: Any) -> Any:
  """True for each parameter that AdamW's weight decay applies to (see DECAYED_LEAVES)."""
  def decayed(path, _):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]  # skips box fields
    if names[-1] not in DECAYED_LEAVES:
      raise ValueError(f"parameter {'/'.join(names)} has no weight-decay rule; add "
                       f"{names[-1]!r} to xlps.train.DECAYED_LEAVES")
    return DECAYED_LEAVES[names[-1]]
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_schedule(t: ml_collections.ConfigDict, decay_steps: int | None = None) -> optax.Schedule:
  """Linear warmup from 0 to ``learning_rate``, then cosine to ``learning_rate x
  end_lr_factor`` at update ``decay_steps`` (default ``t.decay_steps or t.num_steps``), and
  that final rate after it."""
  decay_steps = decay_steps or t.decay_steps or t.num_steps
  return optax.warmup_cosine_decay_schedule(
      0.0, t.learning_rate, t.warmup_steps, max(decay_steps, t.warmup_steps + 1),
      t.learning_rate * t.end_lr_factor)


def make_optimizer(t: ml_collections.ConfigDict,
                   decay_steps: int | None = None) -> optax.GradientTransformation:
  """AdamW on ``make_schedule(t, decay_steps)`` with global-norm clipping (and, with
  ``t.ema_decay``, the parameters' moving average: ``ema_params``)."""
  chain = [optax.clip_by_global_norm(t.grad_clip_norm)] if t.grad_clip_norm > 0 else []
  chain.append(optax.adamw(make_schedule(t, decay_steps), t.b1, t.b2,
                           weight_decay=t.weight_decay, mask=decay_mask))
  if t.ema_decay > 0:
    chain.append(params_ema(t.ema_decay))
  return optax.chain(*chain)


class ParamsEmaState(NamedTuple):
  """The moving average of the parameters (a tree like them, sharded like them)."""

  ema: Any


def params_ema(decay: float) -> optax.GradientTransformation:
  """Keeps ``ema <- decay ema + (1 - decay) new_params`` after every update, starting at the
  initial parameters (TRM's EMA helper); the last link of a chain, it leaves the updates
  as they are. Living in the optimizer state, it is checkpointed and sharded with it."""
  def init(params):
    return ParamsEmaState(jax.tree.map(jnp.asarray, params))

  def update(updates, state, params):
    new = optax.apply_updates(params, updates)
    return updates, ParamsEmaState(jax.tree.map(
        lambda e, p: decay * e + (1.0 - decay) * p.astype(e.dtype), state.ema, new))

  return optax.GradientTransformation(init, update)


def eval_params(state: "TrainState") -> Any:
  """The parameters to evaluate: their moving average with ``train.ema_decay``, else
  ``state.params``."""
  found = [s.ema for s in jax.tree.leaves(state.opt_state,
                                          is_leaf=lambda s: isinstance(s, ParamsEmaState))
           if isinstance(s, ParamsEmaState)]
  return found[0] if found else state.params


def recorded_horizon(metadata: Mapping | None, step: int) -> int | None:
  """The ``decay_steps`` that the run which saved checkpoint ``step`` followed
  (``metadata["schedule"]``; older checkpoints: their config's ``decay_steps or
  num_steps``); None for no checkpoint or a step-0 one (``launch.convert`` writes those),
  which no schedule has run on."""
  if metadata is None or step == 0:
    return None
  if "schedule" in metadata:
    return int(metadata["schedule"]["decay_steps"])
  saved = metadata["config"]["train"]
  return int(saved.get("decay_steps") or saved["num_steps"])


def schedule_horizon(t: ml_collections.ConfigDict, recorded: int | None) -> int:
  """The ``decay_steps`` a run follows: ``train.decay_steps`` when set; else the one it
  resumes on (``recorded``), so a larger ``num_steps`` continues a run at its final rate
  instead of stretching its cosine (the rate would jump up at the resume step); else
  ``num_steps``."""
  return t.decay_steps or recorded or t.num_steps


def schedule_note(t: ml_collections.ConfigDict, recorded: int | None, step: int) -> str | None:
  """What resuming at ``step`` does to the learning rate, when it is not simply the same
  schedule: kept past its end (``decay_steps=0`` with a larger ``num_steps``) or changed
  by an explicit ``train.decay_steps`` (the rate of update ``step + 1`` before and after)."""
  horizon = schedule_horizon(t, recorded)
  if recorded is None or (horizon == recorded and t.num_steps <= horizon):
    return None
  if horizon == recorded:
    final = t.learning_rate * t.end_lr_factor
    return (f"continuing on the schedule this run started with (warmup + cosine over "
            f"{horizon} updates): updates {max(horizon, step) + 1}..{t.num_steps} run at its "
            f"final rate {final:.3g} (learning_rate x end_lr_factor); set "
            f"--config.train.decay_steps to stretch the cosine instead")
  before, after = (float(make_schedule(t, d)(step)) for d in (recorded, horizon))
  return (f"train.decay_steps={horizon} changes the schedule this run followed "
          f"(decay_steps {recorded}): the learning rate at update {step + 1} goes from "
          f"{before:.3g} to {after:.3g}")


def applied_updates(opt_state: Any) -> int:
  """Updates the optimizer has applied (its schedule's count): ``step`` minus the steps
  that ``train.nonfinite=skip`` dropped."""
  return next(int(s.count) for s in jax.tree.leaves(
      opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState))
              if isinstance(s, optax.ScaleByScheduleState))


def loss_and_metrics(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                     loss: str = "softmax_cross_entropy") -> tuple[jax.Array,
                                                                  dict[str, jax.Array]]:
  """Weighted mean cross-entropy (``train.loss``: under softmax or stablemax), plus metric
  sums (loss, tokens, correct, sequences)."""
  nll = losses.token_nll(logits, targets, loss)
  weights = weights.astype(jnp.float32)
  total = weights.sum()
  loss = (nll * weights).sum() / jnp.maximum(total, 1.0)
  correct = (logits.argmax(-1) == targets) * weights
  has_tokens = weights.sum(-1) > 0
  seq_correct = jnp.all((correct > 0) | (weights == 0), axis=-1) & has_tokens
  return loss, {"loss_sum": (nll * weights).sum(), "tokens": total, "correct": correct.sum(),
                "seq_correct": seq_correct.sum().astype(jnp.float32),
                "sequences": has_tokens.sum().astype(jnp.float32)}


def apply_model(model: nn.Module, params: Any, batch: Mapping[str, jax.Array],
                **kwargs) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Logits and what the depth controllers report (``xlps.models.controllers``): their
  metrics (ACT: ``ponder``, the sum over stacks of the mean ``N(t) + R(t)``; routing:
  ``router_loss`` and ``depth``, the mean core iterations a scored position ran; early exit
  at inference: ``depth``) and ``aux_loss``, the sum of their terms of the training loss
  (ACT: ``ponder_weight x ponder``; routing: its weighted auxiliary losses)."""
  deterministic = kwargs.get("deterministic", True)
  reporting = [c for c in controllers.active(model.spec, deterministic, decoding=False)
               if type(c).report is not controllers.Controller.report]
  if not reporting:
    return model.apply({"params": params}, batch, **kwargs), {}
  logits, sown = model.apply({"params": params}, batch, mutable=["losses", "intermediates"],
                             **kwargs)
  extras, terms = {}, []
  for c in reporting:
    term, metrics = c.report(sown, batch)
    extras.update(metrics)
    terms += [] if term is None else [term]
  if terms:
    extras["aux_loss"] = sum(terms)
  return logits, extras


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module,
               optimizer: optax.GradientTransformation, skip_nonfinite: bool = False,
               loss: str = "softmax_cross_entropy") -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step; dropout keys depend only on ``(state.rng, state.step)``.

  ``metrics["nonfinite"]`` is 1 when the loss or the gradients hold NaN/Inf. With
  ``skip_nonfinite`` such a step keeps the params and optimizer state (only ``step``
  advances) and contributes nothing to the metric sums but ``useful_tokens``: the batch's
  non-pad positions (``xlps.families.useful_tokens``), which the step ran on either way.
  """
  dropout_key = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits, extras = apply_model(model, params, batch, deterministic=False,
                                 rngs={"dropout": dropout_key})
    value, metrics = loss_and_metrics(logits, batch["targets"], batch["weights"], loss)
    if "aux_loss" in extras:  # the depth controllers' terms (e.g. ACT: + tau * ponder)
      value = value + extras.pop("aux_loss")
    metrics.update(extras)
    return value, metrics

  (value, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  finite = jnp.isfinite(value) & jnp.isfinite(metrics["grad_norm"])
  if skip_nonfinite:
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    params = jax.tree.map(keep, params, state.params)
    opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    metrics = jax.tree.map(lambda m: jnp.where(finite, m, 0.0), metrics)
  metrics["nonfinite"] = 1.0 - finite.astype(jnp.float32)
  metrics["useful_tokens"] = jnp.asarray(families.useful_tokens(model.spec.family, batch),
                                         jnp.float32)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Mapping[str, jax.Array], iterations: jax.Array | None = None,
              *, model: nn.Module, loss: str = "softmax_cross_entropy") -> dict[str, jax.Array]:
  """Metric sums of one batch (the loss: ``train.loss``'s); a looped model runs
  ``iterations`` core iterations (traced: one compile for every depth; None = its
  ``eval_iterations``)."""
  kwargs = {} if iterations is None else {"iterations": iterations}
  logits, extras = apply_model(model, params, batch, deterministic=True, **kwargs)
  metrics = loss_and_metrics(logits, batch["targets"], batch["weights"], loss)[1]
  extras.pop("aux_loss", None)
  if extras:
    metrics.update(extras, batches=jnp.ones((), jnp.float32))
  return metrics


def state_of(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  """Step 0 of ``params``: fresh optimizer moments, the dropout key of ``seed``."""
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params),
                    rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1))


def init_state(spec: ModelSpec, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  """The initial state with ``nn.LogicallyPartitioned`` boxes (params and optimizer moments)."""
  return state_of(models.init_params(spec, seed=seed), optimizer, seed)


def sharded_init(spec: ModelSpec, optimizer: optax.GradientTransformation, seed: int,
                 mesh: jax.sharding.Mesh, rules) -> tuple[TrainState, Any]:
  """Initialises the state directly into its shardings; returns (state, shardings).

  Shardings come from the logical axis names through ``jax.eval_shape`` (no memory);
  a dimension that its mesh axes do not divide raises ConfigError before compiling.
  """
  boxed = jax.eval_shape(lambda: init_state(spec, optimizer, seed))
  shardings = partitioning.logical_shardings(boxed, mesh, rules)
  partitioning.check_divisible(nn.unbox(boxed), shardings, mesh)
  init = jax.jit(lambda: nn.unbox(init_state(spec, optimizer, seed)), out_shardings=shardings)
  with partitioning.activate(mesh, rules):
    return init(), shardings


@dataclasses.dataclass
class Steps:
  """The initial (sharded) state and the jitted steps of one model on one mesh.

  ``train`` / ``evaluate`` / ``compile_train`` run under the mesh and its logical axis
  rules, so callers never wrap them in ``partitioning.activate``.
  """

  state: TrainState
  state_sharding: Any
  batch_sharding: jax.sharding.NamedSharding
  train_fn: Any
  eval_fn: Any
  eval_depth_fn: Any
  mesh: jax.sharding.Mesh
  rules: partitioning.Rules

  def global_batch(self, local: Mapping[str, Any]) -> dict[str, jax.Array]:
    """This process's rows as global arrays sharded over the batch axes."""
    return partitioning.global_batch(local, self.batch_sharding)

  def compile_train(self, state: TrainState, batch: Mapping[str, jax.Array]) -> float:
    """Compiles the train step ahead (keeps it out of throughput); returns seconds."""
    start = time.perf_counter()
    with partitioning.activate(self.mesh, self.rules):
      self.train_fn = self.train_fn.lower(state, batch).compile()
    return time.perf_counter() - start

  def train(self, state: TrainState,
            batch: Mapping[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    with partitioning.activate(self.mesh, self.rules):
      return self.train_fn(state, batch)

  def evaluate(self, params: Any, batch: Mapping[str, jax.Array],
               iterations: int | None = None) -> dict[str, jax.Array]:
    with partitioning.activate(self.mesh, self.rules):
      if iterations is None:
        return self.eval_fn(params, batch)
      return self.eval_depth_fn(params, batch, jnp.int32(iterations))


def family_steps(spec: ModelSpec) -> tuple[Callable, Callable]:
  """``(train_step, eval_step)`` of ``spec``: its family's own where it has them
  (``xlps.families``: the puzzle family's deep supervision), else this module's."""
  family = families.FAMILIES[spec.family]
  if family.steps and family.uses_steps(spec):
    module = importlib.import_module(family.steps)
    return module.train_step, module.eval_step
  return train_step, eval_step


def make_steps(spec: ModelSpec, optimizer: optax.GradientTransformation, seed: int,
               mesh: jax.sharding.Mesh, rules, skip_nonfinite: bool = False,
               loss: str = "softmax_cross_entropy") -> Steps:
  """``jax.jit`` with in/out shardings and donation: what ``pjit`` used to be."""
  model = models.build(spec)
  state, state_sharding = sharded_init(spec, optimizer, seed, mesh, rules)
  batch_sharding = partitioning.batch_sharding(mesh, rules)
  train_fn = jit_train_step(model, optimizer, state_sharding, batch_sharding, skip_nonfinite,
                            loss)
  evaluate = functools.partial(family_steps(spec)[1], model=model, loss=loss)
  eval_fn = jax.jit(evaluate, in_shardings=(state_sharding.params, batch_sharding))
  eval_depth_fn = jax.jit(evaluate, in_shardings=(state_sharding.params, batch_sharding, None))
  return Steps(state, state_sharding, batch_sharding, train_fn, eval_fn, eval_depth_fn, mesh,
               rules)


def jit_train_step(model: nn.Module, optimizer: optax.GradientTransformation, state_sharding,
                   batch_sharding, skip_nonfinite: bool = False,
                   loss: str = "softmax_cross_entropy"):
  """The train step of ``model`` (``family_steps``) and ``optimizer``, jitted with shardings
  and donation."""
  return jax.jit(functools.partial(family_steps(model.spec)[0], model=model,
                                   optimizer=optimizer, skip_nonfinite=skip_nonfinite,
                                   loss=loss),
                 in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, None), donate_argnums=0)


# Workdir schemes served end to end: epath for our files, TensorStore for Orbax's arrays.
REMOTE_SCHEMES = ("gs://",)


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
  """``workdir`` as an ``epath.Path`` (``pathlib`` would turn ``gs://b`` into ``gs:/b``)."""
  text = os.fspath(workdir)
  if not text.strip():
    raise ConfigError(f"workdir={text!r} is empty; valid: a directory to write checkpoints "
                      "and metrics to (created if missing), local or gs://")
  if "://" in text and not text.startswith(REMOTE_SCHEMES):
    raise ConfigError(f"workdir={text!r}: the scheme {text.split('://')[0] + '://'!r} is not "
                      f"supported; use a local path or one of {', '.join(REMOTE_SCHEMES)}")
  storage.check_filesystem(text)
  return epath.Path(text)


def _check_workdir(workdir: epath.Path) -> None:
  """ConfigError naming the workdir, unless it is (or can be made) a writable directory."""
  import errno
  import resource
  text = os.fspath(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_test.{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    if isinstance(e, FileExistsError) or ("://" not in text and workdir.is_file()):
      why = "it is a file, not a directory"
    elif isinstance(e, NotADirectoryError):
      parent = next((p for p in workdir.parents if p.is_file()), workdir.parent)
      why = f"{os.fspath(parent)!r} is a file, not a directory"
    elif e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):  # EFBIG: ulimit -f
      why = f"disk full / file size limit: {e.strerror or e}"
    else:
      why = e.strerror or str(e)
    raise ConfigError(f"workdir={text!r} cannot be written ({why}); valid: a --workdir that "
                      "is a directory (or a new path) in a writable location with free space"
                      ) from None
  if "://" not in text:
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY:
      logging.warning("the file size limit (ulimit -f) is %d bytes: a checkpoint or metrics file "
                      "in workdir=%r larger than that fails with 'File too large'", limit, text)


def evaluate(params: Any, pipeline: data_lib.Pipeline, steps: Steps, sequences: bool,
             iterations: tuple[int, ...] = ()) -> dict[str, float]:
  """Loss, token accuracy, perplexity (and exact-sequence accuracy) per eval split; for a
  looped model also the loss at each of ``iterations`` core iterations (``..._iter{r}``);
  for a puzzle model the exact-solve accuracy after each test-time supervision step
  (``..._sequence_accuracy_step{s}``).

  Each process reads only its shards of a split and can run out of rows before the others,
  but the step is a collective: before each batch the processes agree whether any still has
  rows, and those that have none feed ``pipeline.padding_batch()`` (weight 0, no effect).
  """
  results = {}
  for split, depth in itertools.product(pipeline.eval_splits, (None, *iterations)):
    sums, batches = None, pipeline.eval_batches(split)
    while True:
      batch = next(batches, None)
      if not multihost_utils.process_allgather(batch is not None).any():
        break
      batch = pipeline.padding_batch(split) if batch is None else batch
      m = jax.device_get(steps.evaluate(params, steps.global_batch(batch), depth))
      sums = m if sums is None else {k: sums[k] + m[k] for k in m}
    prefix = "eval" if split in ("validation", "test") else f"eval_{split}"
    if depth is not None:
      tokens = max(float(sums["tokens"]), 1.0)
      results[f"{prefix}_loss_iter{depth}"] = float(sums["loss_sum"]) / tokens
      continue
    tokens = max(float(sums["tokens"]), 1.0)
    results[f"{prefix}_loss"] = float(sums["loss_sum"]) / tokens
    results[f"{prefix}_accuracy"] = float(sums["correct"]) / tokens
    results[f"{prefix}_perplexity"] = math.exp(min(results[f"{prefix}_loss"], 50.0))
    if sequences:
      results[f"{prefix}_sequence_accuracy"] = float(sums["seq_correct"]) / max(
          float(sums["sequences"]), 1.0)
    for key in controllers.METRICS:  # adaptive depth: batch means, averaged
      if key in sums:
        results[f"{prefix}_{key}"] = float(sums[key]) / float(sums["batches"])
    if "exact_by_step" in sums:  # puzzles: exact-solve accuracy after each supervision step
      sequences = max(float(sums["sequences"]), 1.0)
      for s, exact in enumerate(np.asarray(sums["exact_by_step"]), 1):
        results[f"{prefix}_sequence_accuracy_step{s}"] = float(exact) / sequences
  return results


def due(step: int, every: int, last: int) -> bool:
  """Periodic actions (log, evaluate, checkpoint) fire independently on multiples of their
  own ``every`` and at the last step."""
  return step % every == 0 or step == last


def train_record(m: Mapping[str, Any], steps: int) -> dict[str, float]:
  """Train loss and accuracy over the window's loss-weighted tokens; mean gradient norm;
  the window's count of non-finite steps (skipped ones contribute nothing else). ``m``:
  the window's metric sums, on the host."""
  weighted = max(float(m["tokens"]), 1.0)
  nonfinite = float(m["nonfinite"])
  record = {"train_loss": float(m["loss_sum"]) / weighted,
            "train_accuracy": float(m["correct"]) / weighted,
            "grad_norm": float(m["grad_norm"]) / max(steps - nonfinite, 1.0),
            "nonfinite_steps": nonfinite}
  for key in controllers.METRICS:  # adaptive depth: per-step means
    if key in m:  # e.g. ponder: N + R per position, summed over stacks (ACT)
      record[f"train_{key}"] = float(m[key]) / max(steps - nonfinite, 1.0)
  return record


class NonFiniteError(RuntimeError):
  """Training diverged (NaN/Inf); nothing non-finite was saved. ``launch`` prints it."""


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _diverged(what: str, step: int, ckpt: checkpoint_lib.Checkpointer) -> NonFiniteError:
  last = ckpt.latest_step()
  where = ("no checkpoint was written" if last is None else
           f"the last checkpoint is step {last} in {os.fspath(ckpt.directory)}")
  return NonFiniteError(
      f"training diverged at step {step}: {what}. Nothing non-finite was saved; {where}. "
      "Re-run the same command with a lower --config.train.learning_rate (or larger "
      "--config.train.warmup_steps) to resume from it, or set "
      "--config.train.nonfinite=skip to drop non-finite updates")


WINDOW_KEY = "metrics_window"  # checkpoint metadata: the logging window's steps since its row


def window_metadata(sums: Mapping[str, Any] | None, window: int) -> dict:
  """The metric sums of the ``window`` steps trained since the last logged row, for the
  checkpoint's metadata: a run resumed from it logs the rows an uninterrupted run logs
  (float32 sums are exact in JSON)."""
  if not window:
    return {}
  return {WINDOW_KEY: {"steps": window,
                       "sums": {k: float(v) for k, v in jax.device_get(sums).items()}}}


def restored_window(metadata: Mapping | None) -> tuple[dict[str, jax.Array] | None, int]:
  """``(sums, steps)`` of the logging window a checkpoint was saved in (``window_metadata``);
  ``(None, 0)`` at a window boundary or for checkpoints written before it was stored."""
  saved = (metadata or {}).get(WINDOW_KEY)
  if not saved:
    return None, 0
  return ({k: jnp.asarray(v, jnp.float32) for k, v in saved["sums"].items()},
          int(saved["steps"]))


def checkpoint_metadata(config, spec: ModelSpec, summary: dict) -> dict:
  """JSON stored with every checkpoint: the config, the slot tables, package versions."""
  return {"config": json.loads(config.to_json_best_effort()), "sharing": summary["slots"],
          "unique_params": summary["unique_params"], "versions": checkpoint_lib.package_versions()}


def _check_window(record: dict, window: int, step: int, mode: str,
                  ckpt: checkpoint_lib.Checkpointer) -> None:
  """Stops on any non-finite step (``stop``) or on a window of only skipped ones (``skip``)."""
  bad = int(record["nonfinite_steps"])
  if mode == "stop":
    del record["nonfinite_steps"]
    if bad:
      raise _diverged(f"{bad} of the last {window} steps had a non-finite loss or gradients "
                      f"(train_loss {record['train_loss']}, grad_norm {record['grad_norm']})",
                      step, ckpt)
  elif bad == window:
    raise _diverged(f"all of the last {window} steps had a non-finite loss or gradients and "
                    "were skipped", step, ckpt)


def _save_finite(ckpt: checkpoint_lib.Checkpointer, step: int, state: TrainState,
                 data_state: Any, metadata: dict) -> None:
  """Saves ``state`` unless its parameters hold NaN/Inf (then raises NonFiniteError)."""
  if not bool(_all_finite(state.params)):
    raise _diverged("the parameters hold NaN/Inf", step, ckpt)
  ckpt.save(step, state, data_state, metadata)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns a summary.

  The workdir is locked for the run (``xlps.workdir_lock``): a second run in it stops before
  any work, naming the process that holds it."""
  workdir = workdir_path(workdir)
  spec = config_lib.validate(config, jax.process_count())
  config_lib.check_devices(spec)
  _check_workdir(workdir)
  with workdir_lock.hold(workdir, "launch.train", jax.process_index(), jax.process_count()):
    return _train_and_evaluate(config, workdir, spec)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.Path,
                        spec: ModelSpec) -> dict:
  t = config.train
  is_main = jax.process_index() == 0
  pipeline = data_lib.build(config, process_index=jax.process_index(),
                            process_count=jax.process_count(),
                            tokenizer=data_lib.run_tokenizer(config, workdir))
  if pipeline.vocab_size > spec.vocab_size:  # e.g. a sentencepiece model with fewer pieces
    raise ConfigError(f"model.vocab_size={spec.vocab_size} is smaller than the tokenizer's "
                      f"vocabulary ({pipeline.vocab_size}); set model.vocab_size >= "
                      f"{pipeline.vocab_size}")
  if is_main:  # the run's tokenizer stays with it, for resuming, generation and conversion
    data_lib.keep_tokenizer(pipeline.tokenizer, workdir)
  summary = models.summarize(spec, config.data.seq_len)
  mesh = partitioning.make_mesh(config.mesh)
  rules = partitioning.rules_of(config.mesh)
  setup = make_steps(spec, make_optimizer(t), config.seed, mesh, rules,
                     skip_nonfinite=t.nonfinite == "skip", loss=t.loss)
  state = setup.state

  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", max_to_keep=t.keep_checkpoints,
                                     keep_every_steps=t.keep_every_steps,
                                     async_save=t.async_checkpoints)
  train_iter = pipeline.train_iter()
  try:  # the newest intact checkpoint, if it holds this model (see restore_latest)
    resumed = ckpt.restore_latest(checkpoint_lib.abstract_like(state), model=config.model,
                                  on_mismatch=t.on_mismatch)
  except BaseException:
    train_iter.close()
    ckpt.close()
    raise
  saved = None
  if resumed is not None:
    start, state, data_state, saved = resumed
    if data_state:  # an empty state (e.g. a converted checkpoint) starts the data afresh
      train_iter.set_state(data_state)
    logging.info("Resumed from %s at step %d", ckpt.directory, start)
    changed = checkpoint_lib.resumable_changes(
        ((saved or {}).get("config") or {}).get("model"), config.model)
    if changed and is_main:
      logging.warning("resuming with model settings that change no parameter or optimizer "
                      "state: %s", "; ".join(changed))
  step = int(state.step)
  if step > t.num_steps:
    train_iter.close()
    ckpt.close()
    raise ConfigError(f"train.num_steps={t.num_steps}, but the latest checkpoint in "
                      f"{os.fspath(ckpt.directory)} is at step {step} already: nothing to "
                      f"train; valid: num_steps > {step} to continue this run, or another "
                      "--workdir for a shorter one")
  if step == t.num_steps and is_main:
    logging.warning("the latest checkpoint in %s is at step %d = train.num_steps: this run is "
                    "finished, nothing to train; raise --config.train.num_steps to continue it",
                    os.fspath(ckpt.directory), step)
  recorded = recorded_horizon(saved, step)
  horizon = schedule_horizon(t, recorded)
  if horizon != (t.decay_steps or t.num_steps):  # the schedule the run started with
    setup.train_fn = jit_train_step(models.build(spec), make_optimizer(t, horizon),
                                    setup.state_sharding, setup.batch_sharding,
                                    t.nonfinite == "skip", t.loss)
  note = schedule_note(t, recorded, step)
  if note and is_main:
    logging.warning("%s", note)
  schedule = make_schedule(t, horizon)
  metadata = {**checkpoint_metadata(config, spec, summary), "schedule": {"decay_steps": horizon}}
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main, start_step=step)
  flops, flops_source = metrics_lib.peak_flops(t.peak_flops_per_device)
  if is_main:
    logging.info("%s | %s unique / %s applied params | %s", spec.family,
                 f"{summary['unique_params']:,}", f"{summary['applied_params']:,}",
                 pipeline.describe())

  stop = distributed.StopOnSigterm(step)  # SIGTERM: every process stops at the same step
  history: list[dict] = []
  sums, window = restored_window(saved)  # resumed inside a logging window: its sums so far
  try:
    unconsumed_data_state = train_iter.get_state()  # valid while `batch` is not yet trained on
    batch = setup.global_batch(next(train_iter))
    compile_time = 0.0
    if step < t.num_steps:  # a finished run compiles nothing
      compile_time = setup.compile_train(state, batch)
      if is_main:
        logging.info("train step compiled in %.1f s", compile_time)
    # Tokens the model runs on per step, globally: every position of every row (source and
    # target for encoder_decoder); FLOPs per step: the model FLOPs per (target) token
    # (a looped model's expected depth, its no-grad iterations forward only).
    throughput = metrics_lib.Throughput(families.processed_tokens(spec.family, batch),
                                        models.train_flops_per_token(summary)
                                        * batch["targets"].size, flops)
    if window:
      throughput.carry(window, float(sums["useful_tokens"]))
    t_start = time.perf_counter()
    step_start, last_eval = step, {}
    while step < t.num_steps and not stop(step):
      if batch is None:
        batch = setup.global_batch(next(train_iter))
      state, metrics = setup.train(state, batch)
      batch = None
      step += 1
      window += 1
      throughput.step()
      sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)

      record = {}
      if due(step, t.log_every_steps, t.num_steps):
        totals = jax.device_get(sums)
        record = {**train_record(totals, window),
                  **throughput.report(float(totals["useful_tokens"]))}
        _check_window(record, window, step, t.nonfinite, ckpt)
        sums, window = None, 0
      if due(step, t.eval_every_steps, t.num_steps):
        if is_main:
          logging.info("evaluating at step %d", step)
        with throughput.paused():
          last_eval = evaluate(eval_params(state), pipeline, setup,
                               sequences=(config.data.name == "algorithmic"
                                          or families.FAMILIES[spec.family].layout == "puzzle"),
                               iterations=config_lib.eval_iterations(t, spec))
        record.update(last_eval)
      if record:  # the rate of the last update applied
        record["learning_rate"] = float(schedule(max(applied_updates(state.opt_state) - 1, 0)))
        writer.write(step, record)
        history.append({"step": step, **record})
        if is_main:
          metrics_lib.log_progress(step, t.num_steps, record, step - step_start,
                                   time.perf_counter() - t_start)
      if due(step, t.checkpoint_every_steps, t.num_steps):
        with throughput.paused():
          _save_finite(ckpt, step, state, train_iter.get_state(),
                       {**metadata, **window_metadata(sums, window)})
    if stop.stopped and ckpt.latest_step() != step:
      logging.warning("SIGTERM at step %d: saving a final checkpoint", step)
      data_state = train_iter.get_state() if batch is None else unconsumed_data_state
      _save_finite(ckpt, step, state, data_state, {**metadata, **window_metadata(sums, window)})
  finally:
    stop.close()
    train_iter.close()
    ckpt.close()
    writer.close()
  return {"step": step, "state": state, "summary": summary, "history": history,
          "last_eval": last_eval, "unigram_entropy": pipeline.unigram_entropy,
          "peak_flops": flops, "peak_flops_source": flops_source,
          "wall_time": time.perf_counter() - t_start, "compile_time": compile_time,
          "interrupted": stop.stopped,
          "workdir": os.fspath(workdir)}
