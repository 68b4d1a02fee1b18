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
import shutil
import signal
import tempfile
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
from jax.experimental import multihost_utils
from etils import epath

from xlps import checkpoint as checkpoint_lib
from xlps import config as config_lib
from xlps import data as data_lib
from xlps import models
from xlps import partitioning
from xlps.config import ConfigError, ModelSpec

# Peak dense FLOP/s per device by device kind (bf16; float32 on CPU is measured instead).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
              "TPU v6 lite": 918e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100": 312e12}


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
# embeddings decay, biases and norm scales / biases do not.
DECAYED_LEAVES = {"kernel": True, "embedding": True, "position_embedding": True,
                  "type_embedding": True, "bias": False, "scale": False}


def decay_mask(params: Any) -> Any:
  """True for each parameter that AdamW's weight decay applies to (see DECAYED_LEAVES)."""
  def decayed(path, _):
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]  # skips box fields
    if names[-1] not in DECAYED_LEAVES:
      raise ValueError(f"parameter {'/'.join(names)} has no weight-decay rule; add "
                       f"{names[-1]!r} to xlps.train.DECAYED_LEAVES")
    return DECAYED_LEAVES[names[-1]]
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(t: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW with linear warmup + cosine decay and global-norm clipping."""
  decay_steps = t.decay_steps or t.num_steps
  schedule = optax.warmup_cosine_decay_schedule(
      0.0, t.learning_rate, t.warmup_steps, max(decay_steps, t.warmup_steps + 1),
      t.learning_rate * t.end_lr_factor)
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


# Workdir schemes served end to end: epath for our files, TensorStore for Orbax's arrays.
REMOTE_SCHEMES = ("gs://",)


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
  """``workdir`` as an ``epath.Path`` (``pathlib`` would turn ``gs://b`` into ``gs:/b``)."""
  text = os.fspath(workdir)
  if "://" in text and not text.startswith(REMOTE_SCHEMES):
    raise ConfigError(f"workdir={text!r}: the scheme {text.split('://')[0] + '://'!r} is not "
                      f"supported; use a local path or one of {', '.join(REMOTE_SCHEMES)}")
  return epath.Path(text)


def is_local(path: epath.Path) -> bool:
  return not os.fspath(path).startswith(REMOTE_SCHEMES)


class MetricWriter:
  """``metrics.jsonl`` (one object per record) plus TensorBoard event files.

  Local workdirs append to both. Object stores (gs://) cannot append: there the JSON
  lines are rewritten whole and the events, written to a local staging folder, are
  copied over after every record.
  """

  def __init__(self, workdir: epath.Path, enabled: bool = True):
    self.enabled = enabled
    self.path = workdir / "metrics.jsonl"
    self._tb = self._staging = None
    if enabled:
      from tensorboardX import SummaryWriter  # writes event files without TensorFlow
      self._tb_dir = workdir / "tensorboard"
      if not is_local(workdir):
        self._staging = tempfile.mkdtemp(prefix="xlps_tensorboard_")
        self._lines = self.path.read_text().splitlines(True) if self.path.exists() else []
      self._tb = SummaryWriter(self._staging or os.fspath(self._tb_dir))

  def write(self, step: int, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    line = json.dumps({"step": step, **{k: float(v) for k, v in values.items()}}) + "\n"
    for key, value in values.items():
      self._tb.add_scalar(key, float(value), step)
    self._tb.flush()
    if self._staging is None:
      with self.path.open("a") as f:
        f.write(line)
      return
    self._lines.append(line)
    self.path.write_text("".join(self._lines))
    self._upload_events()

  def _upload_events(self) -> None:
    self._tb_dir.mkdir(parents=True, exist_ok=True)
    for name in os.listdir(self._staging):
      with open(os.path.join(self._staging, name), "rb") as f:
        (self._tb_dir / name).write_bytes(f.read())

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
    if self._staging is not None:
      self._upload_events()
      shutil.rmtree(self._staging, ignore_errors=True)


def _check_workdir(workdir: epath.Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / f".write_test.{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"workdir={os.fspath(workdir)!r} cannot be written ({e.strerror or e}); "
                      "pass a --workdir in a writable location") from None


def _eval(params, pipeline, eval_fn, mesh, rules, batch_sharding,
          sequences: bool) -> dict[str, float]:
  """Loss, token accuracy, perplexity (and exact-sequence accuracy) per eval split.

  Each process reads only its shards of a split and can run out of rows before the others,
  but the step is a collective: before each batch the processes agree whether any still has
  rows, and those that have none feed ``pipeline.padding_batch()`` (weight 0, no effect).
  """
  results = {}
  for split in pipeline.eval_splits:
    sums, batches = None, pipeline.eval_batches(split)
    while True:
      batch = next(batches, None)
      if not multihost_utils.process_allgather(batch is not None).any():
        break
      batch = pipeline.padding_batch() if batch is None else batch
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


def _log_progress(step: int, num_steps: int, record: Mapping[str, float], steps_done: int,
                  seconds: float) -> None:
  """One console line per record: train metrics and/or eval losses, and the ETA."""
  parts = [f"step {step}/{num_steps}"]
  if "train_loss" in record:
    parts += [f"loss {record['train_loss']:.4f}", f"{record['tokens_per_sec']:.0f} tok/s",
              f"MFU {100 * record['mfu']:.1f}%"]
  eta = (num_steps - step) * seconds / max(steps_done, 1)
  parts.append("ETA " + time.strftime("%H:%M:%S", time.gmtime(eta)))
  parts += [f"{k} {v:.4f}" for k, v in record.items() if k.startswith("eval") and
            k.endswith("loss")]
  logging.info(" | ".join(parts))


def checkpoint_metadata(config, spec: ModelSpec, summary: dict) -> dict:
  """JSON stored with every checkpoint: the config, the slot tables, package versions."""
  return {"config": json.loads(config.to_json_best_effort()), "sharing": summary["slots"],
          "unique_params": summary["unique_params"], "versions": checkpoint_lib.package_versions()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
  """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns a summary."""
  workdir = workdir_path(workdir)
  spec = config_lib.validate(config, jax.process_count())
  _check_workdir(workdir)
  t = config.train
  is_main = jax.process_index() == 0
  pipeline = data_lib.build(config, process_index=jax.process_index(),
                            process_count=jax.process_count())
  if pipeline.vocab_size > spec.vocab_size:  # e.g. a sentencepiece model with fewer pieces
    raise ConfigError(f"model.vocab_size={spec.vocab_size} is smaller than the tokenizer's "
                      f"vocabulary ({pipeline.vocab_size}); set model.vocab_size >= "
                      f"{pipeline.vocab_size}")
  summary = models.summarize(spec, config.data.seq_len)
  mesh = partitioning.make_mesh(config.mesh)
  rules = partitioning.rules_of(config.mesh)
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
  sums, window, paused = None, 0, 0.0

  def due(every: int) -> bool:  # logging, evaluation and checkpoints are independent
    return step % every == 0 or step == t.num_steps

  try:
    unconsumed_data_state = train_iter.get_state()  # valid while `batch` is not yet trained on
    batch = partitioning.global_batch(next(train_iter), batch_sharding)
    t_compile = time.perf_counter()
    with partitioning.activate(mesh, rules):  # compile ahead: keeps it out of tokens/s
      train_fn = train_fn.lower(state, batch).compile()
    compile_time = time.perf_counter() - t_compile
    # Tokens the model runs on per step, globally (the unit of flops_per_token): every
    # position of every row, not only the loss-weighted ones.
    tokens_per_step = math.prod(targets_of(batch, spec.family).shape)
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

      record = {}
      if due(t.log_every_steps):
        m = jax.device_get(sums)
        elapsed = time.perf_counter() - t_log - paused  # without evaluation and saving
        weighted = max(float(m["tokens"]), 1.0)
        record = {"train_loss": float(m["loss_sum"]) / weighted,
                  "train_accuracy": float(m["correct"]) / weighted,
                  "grad_norm": float(m["grad_norm"]) / window,
                  "steps_per_sec": window / elapsed,
                  "tokens_per_sec": window * tokens_per_step / elapsed}
        record["mfu"] = record["tokens_per_sec"] * summary["flops_per_token"] / flops
        sums, window, paused, t_log = None, 0, 0.0, time.perf_counter()
      if due(t.eval_every_steps):
        t_eval = time.perf_counter()
        last_eval = _eval(state.params, pipeline, eval_fn, mesh, rules, batch_sharding,
                          sequences=config.data.name == "algorithmic")
        record.update(last_eval)
        paused += time.perf_counter() - t_eval
      if record:
        writer.write(step, record)
        history.append({"step": step, **record})
        if is_main:
          _log_progress(step, t.num_steps, record, step - step_start,
                        time.perf_counter() - t_start)
      if due(t.checkpoint_every_steps):
        t_save = time.perf_counter()
        ckpt.save(step, state, train_iter.get_state(), metadata, force=True)
        paused += time.perf_counter() - t_save
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
          "workdir": os.fspath(workdir)}
