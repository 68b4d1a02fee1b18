"""Training: ``train_and_evaluate(config, workdir)`` and the pure, jitted steps.

Resuming is automatic: the same command on the same workdir continues from the last
checkpoint (params, optimizer state, step, RNG key and data iterator state), and a larger
``--config.train.num_steps`` trains on from there. Dropout keys are
``fold_in(rng, step)``, so a resumed run draws exactly the masks of an uninterrupted one.
SIGTERM saves a checkpoint at the current step and returns cleanly.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import signal
import time
from collections.abc import Mapping
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging

from xlps import checkpoint as checkpoint_lib
from xlps import config as config_lib
from xlps import data as data_lib
from xlps import models
from xlps import partitioning
from xlps.config import ModelSpec

# Peak dense FLOP/s per device by device kind (bf16; float32 on CPU is measured instead).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100": 312e12}


def train_config() -> ml_collections.ConfigDict:
  """Every training key with its default."""
  t = ml_collections.ConfigDict()
  t.num_steps = 1000               # total optimizer steps (extend to continue a finished run)
  t.batch_size = 32                # global batch size (examples)
  t.learning_rate = 1e-3           # peak learning rate
  t.warmup_steps = 100             # linear warmup steps
  t.end_lr_factor = 0.1            # cosine decays to learning_rate * end_lr_factor
  t.decay_steps = 0                # length of warmup + cosine; 0 = num_steps (fix it to extend
                                   # a run without changing the schedule of its first steps)
  t.weight_decay = 0.01            # AdamW decoupled weight decay (not on norms / biases)
  t.b1 = 0.9                       # Adam beta1
  t.b2 = 0.98                      # Adam beta2
  t.grad_clip_norm = 1.0           # global-norm clipping; 0 = off
  t.log_every_steps = 50           # progress line + metrics.jsonl train entry
  t.eval_every_steps = 500         # evaluation on every eval split (and at the end)
  t.checkpoint_every_steps = 500   # checkpoint interval (and at the end / on SIGTERM)
  t.keep_checkpoints = 3           # checkpoints kept (oldest deleted)
  t.async_checkpoints = True       # save in the background while training continues
  t.peak_flops_per_device = 0.0    # for MFU; 0 = by device kind (CPU: measured matmul peak)
  return t


def base_config() -> ml_collections.ConfigDict:
  """A full experiment config with every section at its defaults (configs/ start here)."""
  config = ml_collections.ConfigDict()
  config.seed = 0                                  # init, dropout and data-order seed
  config.model = config_lib.model_config()         # xlps/config.py
  config.data = data_lib.data_config()             # xlps/data
  config.train = train_config()                    # above
  config.mesh = partitioning.mesh_config()         # xlps/partitioning.py
  return config


@flax.struct.dataclass
class TrainState:
  """Everything a step changes; checkpointed as one pytree."""

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warmup + cosine decay and global-norm clipping."""
  decay_steps = t.decay_steps or t.num_steps
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, t.learning_rate, max(t.warmup_steps, 1), max(decay_steps, t.warmup_steps + 1),
      t.learning_rate * t.end_lr_factor)
  decay_mask = lambda params: jax.tree.map(lambda x: x.ndim > 1, params)  # noqa: E731
  chain = [optax.clip_by_global_norm(t.grad_clip_norm)] if t.grad_clip_norm > 0 else []
  chain.append(optax.adamw(schedule, t.b1, t.b2, weight_decay=t.weight_decay, mask=decay_mask))
  return optax.chain(*chain)


def targets_of(batch: Mapping[str, jax.Array], family: str) -> jax.Array:
  return batch["labels"] if family == "encoder_mlm" else batch["targets"]


def loss_and_metrics(logits: jax.Array, targets: jax.Array,
                     weights: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Weighted mean cross-entropy, plus metric sums (loss, tokens, correct, sequences)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32))
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  weights = weights.astype(jnp.float32)
  total = weights.sum()
  loss = (nll * weights).sum() / jnp.maximum(total, 1.0)
  correct = (logits.argmax(-1) == targets) * weights
  has_tokens = weights.sum(-1) > 0
  seq_correct = jnp.all((correct > 0) | (weights == 0), axis=-1) & has_tokens
  return loss, {"loss_sum": (nll * weights).sum(), "tokens": total, "correct": correct.sum(),
                "seq_correct": seq_correct.sum().astype(jnp.float32),
                "sequences": has_tokens.sum().astype(jnp.float32)}


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model: nn.Module,
               optimizer: optax.GradientTransformation,
               family: str) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step; dropout keys depend only on ``(state.rng, state.step)``."""
  dropout_key = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits = model.apply({"params": params}, batch, deterministic=False,
                         rngs={"dropout": dropout_key})
    return loss_and_metrics(logits, targets_of(batch, family), batch["weights"])

  (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics["grad_norm"] = optax.tree.norm(grads)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Mapping[str, jax.Array], *, model: nn.Module,
              family: str) -> dict[str, jax.Array]:
  logits = model.apply({"params": params}, batch, deterministic=True)
  return loss_and_metrics(logits, targets_of(batch, family), batch["weights"])[1]


def init_state(spec: ModelSpec, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
  """The initial state with ``nn.LogicallyPartitioned`` boxes (params and optimizer moments)."""
  params = models.init_params(spec, seed=seed)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params),
                    rng=jax.random.fold_in(jax.random.PRNGKey(seed), 1))


def sharded_init(spec: ModelSpec, optimizer: optax.GradientTransformation, seed: int,
                 mesh: jax.sharding.Mesh, rules) -> tuple[TrainState, Any]:
  """Initialises the state directly into its shardings; returns (state, shardings).

  Shardings come from the logical axis names through ``jax.eval_shape`` (no memory);
  a dimension that its mesh axes do not divide raises ValueError before compiling.
  """
  boxed = jax.eval_shape(lambda: init_state(spec, optimizer, seed))
  shardings = partitioning.logical_shardings(boxed, mesh, rules)
  partitioning.check_divisible(nn.unbox(boxed), shardings, mesh)
  init = jax.jit(lambda: nn.unbox(init_state(spec, optimizer, seed)), out_shardings=shardings)
  with partitioning.activate(mesh, rules):
    return init(), shardings


@dataclasses.dataclass
class Steps:
  """The initial (sharded) state and the jitted steps of one model on one mesh."""

  state: TrainState
  state_sharding: Any
  batch_sharding: jax.sharding.NamedSharding
  train_fn: Any
  eval_fn: Any


def make_steps(spec: ModelSpec, optimizer: optax.GradientTransformation, seed: int,
               mesh: jax.sharding.Mesh, rules) -> Steps:
  """``jax.jit`` with in/out shardings and donation: what ``pjit`` used to be."""
  model = models.build(spec)
  state, state_sharding = sharded_init(spec, optimizer, seed, mesh, rules)
  batch_sharding = partitioning.batch_sharding(mesh, rules)
  train_fn = jax.jit(functools.partial(train_step, model=model, optimizer=optimizer,
                                       family=spec.family),
                     in_shardings=(state_sharding, batch_sharding),
                     out_shardings=(state_sharding, None), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(eval_step, model=model, family=spec.family),
                    in_shardings=(state_sharding.params, batch_sharding))
  return Steps(state, state_sharding, batch_sharding, train_fn, eval_fn)


def measured_peak_flops(n: int = 1024, repeats: int = 5) -> float:
  """Best float32 matmul FLOP/s of this device: the CPU's practical ceiling for MFU."""
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = math.inf
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


def peak_flops(t: ml_collections.ConfigDict) -> tuple[float, str]:
  """Peak FLOP/s of all devices and where the number comes from."""
  devices = jax.devices()
  if t.peak_flops_per_device:
    return t.peak_flops_per_device * len(devices), "config"
  kind = devices[0].device_kind
  for prefix, flops in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return flops * len(devices), kind
  return measured_peak_flops(), f"measured {kind} matmul peak"


class MetricWriter:
  """``metrics.jsonl`` (one object per logged step) plus TensorBoard event files."""

  def __init__(self, workdir: pathlib.Path, enabled: bool = True):
    self.enabled = enabled
    self.path = workdir / "metrics.jsonl"
    self._tb = None
    if enabled:
      from tensorboardX import SummaryWriter  # writes event files without TensorFlow
      self._tb = SummaryWriter(str(workdir / "tensorboard"))

  def write(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    with self.path.open("a") as f:
      f.write(json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n")
    for key, value in values.items():
      self._tb.add_scalar(key, float(value), step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _check_workdir(workdir: pathlib.Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_test.{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ValueError(f"workdir={str(workdir)!r} cannot be written ({e.strerror}); pass a "
                     "--workdir in a writable location") from None


def validate(config: ml_collections.ConfigDict) -> ModelSpec:
  """Checks every section before anything is traced; returns the model spec."""
  spec = models.spec_of(config)
  t = config.train
  for key in ("num_steps", "batch_size", "log_every_steps", "eval_every_steps",
              "checkpoint_every_steps", "keep_checkpoints"):
    if not isinstance(t[key], int) or t[key] < 1:
      raise ValueError(f"train.{key}={t[key]!r} must be an integer >= 1")
  if t.learning_rate <= 0:
    raise ValueError(f"train.learning_rate={t.learning_rate!r} must be > 0")
  return spec


def _eval(params, pipeline, eval_fn, mesh, rules, batch_sharding,
          sequences: bool) -> dict[str, float]:
  """Loss, token accuracy, perplexity (and exact-sequence accuracy) per eval split."""
  results = {}
  for split in pipeline.eval_splits:
    sums = None
    for batch in pipeline.eval_batches(split):
      with partitioning.activate(mesh, rules):
        m = jax.device_get(eval_fn(params, partitioning.global_batch(batch, batch_sharding)))
      sums = m if sums is None else {k: sums[k] + m[k] for k in m}
    prefix = "eval" if split in ("validation", "test") else f"eval_{split}"
    tokens = max(float(sums["tokens"]), 1.0)
    results[f"{prefix}_loss"] = float(sums["loss_sum"]) / tokens
    results[f"{prefix}_accuracy"] = float(sums["correct"]) / tokens
    results[f"{prefix}_perplexity"] = math.exp(min(results[f"{prefix}_loss"], 50.0))
    if sequences:
      results[f"{prefix}_sequence_accuracy"] = float(sums["seq_correct"]) / max(
          float(sums["sequences"]), 1.0)
  return results


def checkpoint_metadata(config, spec: ModelSpec, summary: dict) -> dict:
  """JSON stored with every checkpoint: the config, the slot tables, package versions."""
  return {"config": json.loads(config.to_json_best_effort()), "sharing": summary["slots"],
          "unique_params": summary["unique_params"], "versions": checkpoint_lib.package_versions()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns a summary."""
  workdir = pathlib.Path(workdir)
  spec = validate(config)
  _check_workdir(workdir)
  t = config.train
  is_main = jax.process_index() == 0
  pipeline = data_lib.build(config, process_index=jax.process_index(),
                            process_count=jax.process_count())
  if pipeline.vocab_size > spec.vocab_size:
    raise ValueError(f"model.vocab_size={spec.vocab_size} is smaller than the tokenizer's "
                     f"vocabulary ({pipeline.vocab_size}); set model.vocab_size >= "
                     f"{pipeline.vocab_size}")
  summary = models.summarize(spec, config.data.seq_len)
  mesh = partitioning.make_mesh(config.mesh)
  rules = partitioning.rules_of(config.mesh)
  local_batch = t.batch_size // jax.process_count()
  if local_batch * jax.process_count() != t.batch_size or t.batch_size % (
      mesh.shape["data"] * mesh.shape["fsdp"]):
    raise ValueError(f"train.batch_size={t.batch_size} must divide evenly over "
                     f"{jax.process_count()} processes and the mesh's data x fsdp = "
                     f"{mesh.shape['data'] * mesh.shape['fsdp']} batch shards")
  setup = make_steps(spec, make_optimizer(t), config.seed, mesh, rules)
  state, train_fn, eval_fn, batch_sharding = (setup.state, setup.train_fn, setup.eval_fn,
                                              setup.batch_sharding)

  ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", max_to_keep=t.keep_checkpoints,
                                     async_save=t.async_checkpoints)
  train_iter = pipeline.train_iter()
  start = ckpt.latest_step()
  if start is not None:
    state, data_state, _ = ckpt.restore(start, checkpoint_lib.abstract_like(state))
    if data_state:  # an empty state (e.g. a converted checkpoint) starts the data afresh
      train_iter.set_state(data_state)
    logging.info("Resumed from %s at step %d", ckpt.directory, start)
  step = int(state.step)
  metadata = checkpoint_metadata(config, spec, summary)
  writer = MetricWriter(workdir, enabled=is_main)
  flops, flops_source = peak_flops(t)
  if is_main:
    logging.info("%s | %s unique / %s applied params | %s", spec.family,
                 f"{summary['unique_params']:,}", f"{summary['applied_params']:,}",
                 pipeline.describe())

  stop = {"signal": None}
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(signal=signum))
  history: list[dict] = []
  sums, window = None, 0
  try:
    unconsumed_data_state = train_iter.get_state()  # valid while `batch` is not yet trained on
    batch = partitioning.global_batch(next(train_iter), batch_sharding)
    t_compile = time.perf_counter()
    with partitioning.activate(mesh, rules):  # compile ahead: keeps it out of tokens/s
      train_fn = train_fn.lower(state, batch).compile()
    compile_time = time.perf_counter() - t_compile
    if is_main:
      logging.info("train step compiled in %.1f s", compile_time)
    t_start = t_log = time.perf_counter()
    step_start, last_eval = step, {}
    while step < t.num_steps and stop["signal"] is None:
      if batch is None:
        batch = partitioning.global_batch(next(train_iter), batch_sharding)
      with partitioning.activate(mesh, rules):
        state, metrics = train_fn(state, batch)
      batch = None
      step += 1
      window += 1
      sums = metrics if sums is None else jax.tree.map(jnp.add, sums, metrics)

      if step % t.log_every_steps == 0 or step == t.num_steps:
        m = jax.device_get(sums)
        elapsed = time.perf_counter() - t_log
        tokens = float(m["tokens"])
        seen_steps = step - step_start
        record = {"train_loss": float(m["loss_sum"]) / max(tokens, 1.0),
                  "train_accuracy": float(m["correct"]) / max(tokens, 1.0),
                  "grad_norm": float(m["grad_norm"]) / window,
                  "tokens_per_sec": tokens * jax.process_count() / elapsed}
        record["mfu"] = record["tokens_per_sec"] * summary["flops_per_token"] / flops
        if step % t.eval_every_steps == 0 or step == t.num_steps:
          last_eval = _eval(state.params, pipeline, eval_fn, mesh, rules, batch_sharding,
                            sequences=config.data.name == "algorithmic")
          record.update(last_eval)
        writer.write(step, record)
        history.append({"step": step, **record})
        rate = seen_steps / (time.perf_counter() - t_start)
        eta = (t.num_steps - step) / max(rate, 1e-9)
        if is_main:
          evals = "".join(f" | {k} {v:.4f}" for k, v in last_eval.items()
                          if k.endswith("loss") and k in record)
          logging.info("step %d/%d | loss %.4f | %.0f tok/s | MFU %.1f%% | ETA %s%s", step,
                       t.num_steps, record["train_loss"], record["tokens_per_sec"],
                       100 * record["mfu"], time.strftime("%H:%M:%S", time.gmtime(eta)), evals)
        sums, window, t_log = None, 0, time.perf_counter()
      if step % t.checkpoint_every_steps == 0 or step == t.num_steps:
        ckpt.save(step, state, train_iter.get_state(), metadata, force=True)
    if stop["signal"] is not None and ckpt.latest_step() != step:
      logging.warning("SIGTERM at step %d: saving a final checkpoint", step)
      data_state = train_iter.get_state() if batch is None else unconsumed_data_state
      ckpt.save(step, state, data_state, metadata, force=True)
  finally:
    signal.signal(signal.SIGTERM, previous)
    train_iter.close()
    ckpt.close()
    writer.close()
  return {"step": step, "state": state, "summary": summary, "history": history,
          "last_eval": last_eval, "unigram_entropy": pipeline.unigram_entropy,
          "peak_flops": flops, "peak_flops_source": flops_source,
          "wall_time": time.perf_counter() - t_start, "compile_time": compile_time,
          "interrupted": stop["signal"] is not None,
          "workdir": str(workdir)}
