"""Per-device memory of the real train step on 8-device meshes: compiled, never run.

    .venv/bin/python -m bench.memory_plan --out=bench/memory_plan.md

For ALBERT-xxlarge (``configs/albert.py:xxlarge``) and a ~1B applied-parameter weight-tied
decoder LM (d_model 2048, FFN 8192, 16 heads, one layer applied 20 times, vocab 32000,
seq 2048), on meshes data=8, fsdp=8, fsdp=4 x tensor=2 and tensor=8 of 8 fake CPU devices,
with remat off and full, this compiles ``xlps.train.train_step`` with the AdamW of
``xlps.train.make_optimizer``, jitted as ``xlps.train.make_steps`` jits it (state and batch
shardings from the logical axis rules, state donated), on abstract inputs
(``jax.ShapeDtypeStruct`` with shardings): nothing is initialised or run, so models far
larger than this machine's memory compile in seconds. It reports
``compiled.memory_analysis()`` per device, splits the state's bytes into parameters and
optimizer state from the per-device shard shapes of their shardings, and sets both against
the README's "Planning for scale" formula (``predict``). A second table checks the formula's
per-layer term: the slope of XLA's temp bytes between N and N/2 applied layers.
"""

from __future__ import annotations

import functools
import math
import subprocess
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import flags

from bench import harness
from bench.sharded_run import mesh_config
from configs import albert
from xlps import config as config_lib
from xlps import families, models, partitioning, train

_OUT = flags.DEFINE_string("out", "", "Also write the markdown report here.")

MIB = 2 ** 20
MESHES = (("data=8", {"data": 8}), ("fsdp=8", {"fsdp": 8}),
          ("fsdp=4 tensor=2", {"fsdp": 4, "tensor": 2}), ("tensor=8", {"tensor": 8}))
REMAT = ("none", "full")
# What the data pipeline feeds each batch layout (xlps.data.pipeline), besides targets/weights.
LAYOUT_KEYS = {"lm": ("inputs", "segment_ids", "positions"),
               "mlm": ("inputs", "input_mask", "token_types")}
# Tensors one applied layer saves for its backward pass without remat, per token, counted
# with jax.ad_checkpoint.print_saved_residuals on this block (pre- and post-LN alike):
# d_model wide (residual stream, norm inputs, centred and normalised values, attention and
# FFN outputs), split over heads (q, k, v, context), FFN wide (by activation: the erf GELU
# keeps 4, the tanh GELU 6) and attention-score sized (s per head: logits, probabilities).
SAVED = {"d_model": 8, "heads": 4, "scores": 2}
FFN_SAVED = {"gelu": 4, "gelu_tanh": 6}


def albert_xxlarge(batch: int, seq_len: int) -> ml_collections.ConfigDict:
  """ALBERT-xxlarge: H 4096, 64 heads, FFN 16384, one set applied 12 times, E 128."""
  config = albert.get_config("xxlarge")
  config.train.batch_size, config.data.seq_len = batch, seq_len
  return config


def tied_lm_1b(batch: int, seq_len: int) -> ml_collections.ConfigDict:
  """A weight-tied decoder LM: one layer (d 2048, FFN 8192, 16 heads) applied 20 times,
  vocab 32000, tied embeddings, learned positions: 0.12B unique, 1.07B applied params."""
  config = config_lib.base_config()
  m = config.model
  m.family, m.vocab_size, m.d_model, m.num_heads, m.d_ff = "decoder_lm", 32000, 2048, 16, 8192
  m.num_layers, m.max_len = 20, seq_len
  m.sharing = config_lib.sharing_config(num_unique=1)
  config.data.seq_len, config.train.batch_size = seq_len, batch
  return config


# name: (config maker, global batch, sequence length)
MODELS = {"ALBERT-xxlarge": (albert_xxlarge, 8, 512), "tied LM 1B": (tied_lm_1b, 8, 2048)}


def shard_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of ``ShapeDtypeStruct`` with shardings."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def used_bytes(tree: Any, mesh: jax.sharding.Mesh) -> int:
  """Bytes one device holds of ``tree`` as the matmuls use it: gathered over ``data`` and
  ``fsdp``, split over ``tensor`` only."""
  total = 0
  for x in jax.tree.leaves(tree):
    shards = 1
    for axes in x.sharding.spec:
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      shards *= math.prod(mesh.shape[a] for a in axes if a == "tensor")
    total += x.size * x.dtype.itemsize // shards
  return total


def abstract_inputs(spec, optimizer, mesh, rules, batch: int, seq_len: int):
  """(state, batch, state shardings, batch sharding), inputs as sharded ShapeDtypeStructs."""
  boxed = jax.eval_shape(lambda: train.init_state(spec, optimizer, 0))
  shardings = partitioning.logical_shardings(boxed, mesh, rules)
  partitioning.check_divisible(nn.unbox(boxed), shardings, mesh)
  state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                       nn.unbox(boxed), shardings)
  batch_sharding = partitioning.batch_sharding(mesh, rules)
  keys = LAYOUT_KEYS[families.FAMILIES[spec.family].layout]
  inputs = {k: jax.ShapeDtypeStruct((batch, seq_len), jnp.int32, sharding=batch_sharding)
            for k in (*keys, "targets")}
  inputs["weights"] = jax.ShapeDtypeStruct((batch, seq_len), jnp.float32,
                                           sharding=batch_sharding)
  return state, inputs, shardings, batch_sharding


def measure(config: ml_collections.ConfigDict, axes: dict, remat: str) -> dict:
  """Compiles the train step of ``config`` on the mesh ``axes``: bytes per device, measured
  (XLA) and predicted (``predict``), and the compile time."""
  config.model.remat_policy = remat
  spec = models.spec_of(config)
  optimizer = train.make_optimizer(config.train)
  cfg = mesh_config(**axes)
  mesh, rules = partitioning.make_mesh(cfg), partitioning.rules_of(cfg)
  batch, seq_len = config.train.batch_size, config.data.seq_len
  state, inputs, shardings, batch_sharding = abstract_inputs(spec, optimizer, mesh, rules,
                                                             batch, seq_len)
  step = jax.jit(functools.partial(train.train_step, model=models.build(spec),
                                   optimizer=optimizer),
                 in_shardings=(shardings, batch_sharding), out_shardings=(shardings, None),
                 donate_argnums=0)
  start = time.perf_counter()
  with partitioning.activate(mesh, rules):
    compiled = step.lower(state, inputs).compile()
  mem = compiled.memory_analysis()
  return {"compile_s": time.perf_counter() - start, "params": shard_bytes(state.params),
          "opt": shard_bytes(state.opt_state), "other": shard_bytes((state.step, state.rng)),
          "batch": shard_bytes(inputs), "argument": mem.argument_size_in_bytes,
          "output": mem.output_size_in_bytes, "alias": mem.alias_size_in_bytes,
          "temp": mem.temp_size_in_bytes, "code": mem.generated_code_size_in_bytes,
          "predicted": predict(spec, state, mesh, batch, seq_len, remat)}


def layer_bytes(spec, rows: int, seq_len: int, tensor: int) -> float:
  """Bytes one applied layer saves for the backward pass without remat (float32):
  4 b s (8 d + 4 d/t + c_ff d_ff/t + 2 s h/t)."""
  per_token = (SAVED["d_model"] * spec.d_model + SAVED["heads"] * spec.d_model / tensor
               + FFN_SAVED[spec.activation] * spec.d_ff / tensor
               + SAVED["scores"] * seq_len * spec.num_heads / tensor)
  return 4 * rows * seq_len * per_token


def predict(spec, state, mesh, batch: int, seq_len: int, remat: str) -> dict[str, float]:
  """The README's "Planning for scale" formula, per device, in bytes (float32 throughout).

  Arguments: parameters (4 x each tensor's size / its shards), AdamW's two moments (2x
  that), the batch. Temp: what the forward saves across depth (N x ``layer_bytes`` without
  remat; N layer inputs, 4 b s d each, with full remat), plus twice the weights as the
  matmuls use them (``used_bytes``: the scan's gradient accumulator of the shared layer and
  either the gathered weights (fsdp) or the all-reduced gradient (data)), plus the
  attention mask broadcast over heads (bool and float32: 5 b h s^2 / t), plus the larger of
  two transient peaks of the backward pass: the output head's three (b, s, V/t) float32
  buffers (logits, softmax, their gradient) or one layer's saved tensors.
  """
  t = mesh.shape["tensor"]
  rows = batch // (mesh.shape["data"] * mesh.shape["fsdp"])
  n = sum(plan.num_layers for plan in spec.stacks)
  layer = layer_bytes(spec, rows, seq_len, t)
  saved = n * layer if remat == "none" else n * 4 * rows * seq_len * spec.d_model
  weights = 2 * used_bytes(state.params, mesh)
  mask = 5 * rows * spec.num_heads * seq_len ** 2 / t
  transient = max(3 * 4 * rows * seq_len * spec.vocab_size / t, layer)
  params = shard_bytes(state.params)
  return {"params": params, "opt": 2 * params, "saved": saved, "weights": weights,
          "mask": mask, "transient": transient, "temp": saved + weights + mask + transient}


def mib(x: float) -> str:
  return f"{x / MIB:,.0f}"


def gap(measured: float, predicted: float) -> str:
  return f"{100 * (predicted - measured) / measured:+.1f}%"


def main(argv):
  del argv
  grid = ["| model | mesh | remat | params | AdamW state | argument: XLA / formula | "
          "output (aliased) | temp: XLA / formula (gap) | argument + temp | compile s |",
          "|" + "---|" * 10]
  terms = ["| model | mesh | remat | saved across depth | 2 x weights as used | mask | "
           "transient | formula temp |", "|" + "---|" * 8]
  gaps, exact, code = {remat: [] for remat in REMAT}, True, 0
  for name, (make, batch, seq_len) in MODELS.items():
    for mesh_name, axes in MESHES:
      for remat in REMAT:
        m = measure(make(batch, seq_len), axes, remat)
        p = m["predicted"]
        gaps[remat].append((p["temp"] - m["temp"]) / m["temp"])
        args_formula = p["params"] + p["opt"] + m["batch"]
        exact = exact and abs(m["argument"] - args_formula - m["other"]) < 1024
        code = max(code, m["code"])
        grid.append(
            f"| {name} | {mesh_name} | {remat} | {mib(m['params'])} | {mib(m['opt'])} | "
            f"{mib(m['argument'])} / {mib(args_formula)} | {mib(m['output'])} "
            f"({mib(m['alias'])}) | {mib(m['temp'])} / {mib(p['temp'])} "
            f"({gap(m['temp'], p['temp'])}) | {mib(m['argument'] + m['temp'])} | "
            f"{m['compile_s']:.0f} |")
        terms.append(f"| {name} | {mesh_name} | {remat} | {mib(p['saved'])} | "
                     f"{mib(p['weights'])} | {mib(p['mask'])} | {mib(p['transient'])} | "
                     f"{mib(p['temp'])} |")
        print(grid[-1], flush=True)
  slopes = ["| model | remat | N / N/2 | temp at N / N/2 (XLA) | per applied layer: XLA / "
            "formula |", "|---|---|---|---|---|"]
  for name, (make, batch, seq_len) in MODELS.items():
    for remat in REMAT:
      config = make(batch, seq_len)
      n = config.model.num_layers
      full = measure(config, {"data": 8}, remat)
      config = make(batch, seq_len)
      config.model.num_layers = n // 2
      half = measure(config, {"data": 8}, remat)
      slope = (full["temp"] - half["temp"]) / (n - n // 2)
      spec = models.spec_of(config)
      rows = batch // 8
      formula = (layer_bytes(spec, rows, seq_len, 1) if remat == "none"
                 else 4 * rows * seq_len * spec.d_model)
      slopes.append(f"| {name} | {remat} | {n} / {n // 2} | {mib(full['temp'])} / "
                    f"{mib(half['temp'])} | {slope / MIB:,.2f} / {formula / MIB:,.2f} |")
      print(slopes[-1], flush=True)
  commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                          text=True, cwd=harness.ROOT)
  text = "\n".join([
      "# Memory plan: per-device bytes of the train step on 8 devices (compiled, not run)",
      "", f"    {harness.command()}",
      "", f"jax {jax.__version__}, 8 fake CPU devices (`--xla_force_host_platform_device_count"
      f"=8`), source {commit.stdout.strip() or 'unknown'}. MiB per device. float32 params, "
      "AdamW moments and compute; ALBERT-xxlarge batch 8 x 512, tied LM 1B batch 8 x 2048 "
      "(global). Formula: README, \"Planning for scale\". Generated code size "
      f"(`generated_code_size_in_bytes`): {mib(code)} MiB on this backend.", "", *grid, "",
      "Arguments: XLA's argument bytes equal params + AdamW state + batch + step/RNG (from "
      f"the shard shapes) {'to < 1 KiB in every row' if exact else 'NOT in every row'}; the "
      "outputs alias them (state donated). Temp, formula against XLA: "
      + "; ".join(f"remat {r}: {100 * min(g):+.1f}% to {100 * max(g):+.1f}%"
                  for r, g in gaps.items()) + ".", "",
      "Formula terms of temp (MiB per device):", "", *terms, "",
      "Per-layer check on data=8: slope of XLA temp between N and N/2 applied layers against "
      "the formula's per-layer bytes (no remat: `layer_bytes`; full remat: one layer input).",
      "", *slopes])
  harness.report(text, _OUT.value)


if __name__ == "__main__":
  harness.run(main, cpu_devices=8)
