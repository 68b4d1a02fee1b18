"""Compile time of the deep-supervision train step and the eval step of a TRM puzzle model
vs. cycles T and supervision steps N_sup.

The recursion applies ``T x (n + 1) x net_layers`` layers per supervision step as scans (a
detached no-grad prefix scan and the trained scan), and ``train_step`` runs up to N_sup
supervision steps (one optimizer update each) as one ``lax.while_loop``; ``eval_step`` scans
``eval_supervision_steps``. So both programs should compile in time flat in T and in N_sup.
This measures it: T in ``--cycles`` at fixed ``--fixed_supervision_steps``, and N_sup in
``--supervision_steps`` at fixed ``--fixed_cycles``.

Every point runs in a fresh Python process (this script re-invoked with ``--child``,
``bench.harness.child``) with JAX's persistent compilation cache off, so no cache serves a
later point. The programs are the jitted steps of ``xlps.train.make_steps`` (shardings and
donation as in training), lowered and compiled ahead of time on a real puzzle batch.

Usage (from the repository root):

    .venv/bin/python -m bench.compile_time_recursion --out=bench/compile_time_recursion.md
    .venv/bin/python -m bench.compile_time_recursion --cycles=1,8 --supervision_steps=1,64 --repeats=1
    .venv/bin/python -m bench.compile_time_recursion --halting=q_learning --gradient=one_step
    .venv/bin/python -m bench.compile_time_recursion --execute   # also run each step once
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from absl import flags

from bench import harness

_CYCLES = flags.DEFINE_list("cycles", ["1", "2", "4", "8"], "Cycles T (at fixed N_sup).")
_SUPERVISION = flags.DEFINE_list("supervision_steps", ["1", "4", "16", "64"],
                                 "Supervision steps N_sup (at fixed T).")
_FIXED_CYCLES = flags.DEFINE_integer("fixed_cycles", 2, "T while N_sup varies.")
_FIXED_SUPERVISION = flags.DEFINE_integer("fixed_supervision_steps", 4, "N_sup while T varies.")
_LATENT_STEPS = flags.DEFINE_integer("latent_steps", 2, "n: latent updates per cycle.")
_NET_LAYERS = flags.DEFINE_integer("net_layers", 2, "Layers of the recursed net.")
_GRADIENT = flags.DEFINE_enum("gradient", "last_cycle", ["last_cycle", "one_step"],
                              "model.recursion.gradient.")
_HALTING = flags.DEFINE_enum("halting", "bce", ["none", "bce", "q_learning"],
                             "model.recursion.halting.")
_D_MODEL = flags.DEFINE_integer("d_model", 64, "Model width.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", 2, "Attention heads.")
_D_FF = flags.DEFINE_integer("d_ff", 128, "FFN width.")
_PUZZLE_SIZE = flags.DEFINE_integer("puzzle_size", 9, "Sudoku side: seq_len = size^2, "
                                    "vocab = size + 2.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Batch size.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Fresh-process repeats per point.")
_EXECUTE = flags.DEFINE_bool("execute", False, "Also run each compiled step once (untimed "
                             "sanity check: finite loss, supervision steps run).")
_OUT = flags.DEFINE_string("out", None, "Also write the markdown report here.")


# --------------------------------------------------------------------------- child side


def _hlo_ops(text: str) -> int:
  """Instructions of an optimized HLO module's text (lines that assign a value)."""
  return sum(1 for line in text.splitlines() if " = " in line and not line.lstrip().startswith(
      ("HloModule", "//")))


def measure_single(cycles: int, supervision_steps: int, latent_steps: int, net_layers: int,
                   gradient: str, halting: str, d_model: int, num_heads: int, d_ff: int,
                   puzzle_size: int, batch_size: int, execute: bool) -> dict:
  """Uncached lower + compile of the train and eval steps in this fresh process."""
  import jax
  jax.config.update("jax_enable_compilation_cache", False)  # no persistent (disk) cache
  import jax.numpy as jnp
  import numpy as np

  from xlps import config as C
  from xlps import models, partitioning, train
  from xlps.data import puzzles

  cfg = C.base_config()
  m = cfg.model
  m.family = "puzzle"
  m.vocab_size = puzzles.sudoku_vocab_size(puzzle_size)
  m.d_model, m.num_heads, m.d_ff = d_model, num_heads, d_ff
  m.max_len = puzzle_size ** 2
  m.norm_position, m.norm, m.tie_embeddings = "post", "rmsnorm", False
  r = m.recursion
  r.net_layers, r.latent_steps, r.cycles = net_layers, latent_steps, cycles
  r.gradient, r.halting, r.supervision_steps = gradient, halting, supervision_steps
  m.num_layers = cycles * (latent_steps + 1) * net_layers
  spec = models.spec_of(cfg)
  mesh, rules = partitioning.make_mesh(cfg.mesh), partitioning.rules_of(cfg.mesh)
  steps = train.make_steps(spec, train.make_optimizer(cfg.train), 0, mesh, rules)

  rng = np.random.default_rng(0)
  rows = [puzzles.generate_sudoku(puzzle_size, puzzle_size ** 2 // 2, rng)
          for _ in range(batch_size)]
  batch = steps.global_batch({
      "inputs": np.stack([puzzles.sudoku_tokens(p) for p, _, _ in rows]).astype(np.int32),
      "targets": np.stack([puzzles.sudoku_tokens(s) for _, s, _ in rows]).astype(np.int32),
      "weights": np.ones((batch_size, puzzle_size ** 2), np.float32)})
  jax.block_until_ready((steps.state, batch))
  # Warm up the backend with an unrelated small program, so the timed compile does not
  # include XLA's one-time start-up cost in this fresh process.
  jax.jit(lambda a: jnp.tanh(a @ a.T).sum()).lower(jnp.ones((8, 8))).compile()

  result = {"applied_layers": spec.recursion.num_layers,
            "no_grad_layers": spec.recursion.no_grad_layers,
            "backend": jax.default_backend()}
  state = steps.state
  with partitioning.activate(mesh, rules):
    for name, fn in (("train", steps.train_fn), ("eval", steps.eval_fn)):
      # the train step donates the state: the eval step reads the params it returned
      args = (state, batch) if name == "train" else (state.params, batch)
      t0 = time.perf_counter()
      lowered = fn.lower(*args)
      t1 = time.perf_counter()
      compiled = lowered.compile()
      t2 = time.perf_counter()
      result[f"{name}_lower_s"] = t1 - t0
      result[f"{name}_compile_s"] = t2 - t1
      result[f"{name}_stablehlo_lines"] = len(lowered.as_text().splitlines())
      result[f"{name}_hlo_ops"] = _hlo_ops(compiled.as_text())
      if execute:
        if name == "train":
          state, metrics = compiled(*args)
          loss = float(metrics["loss_sum"]) / max(float(metrics["tokens"]), 1.0)
          if not np.isfinite(loss):
            raise RuntimeError(f"non-finite train loss at T={cycles}, N_sup={supervision_steps}")
          result["train_loss"] = loss
          result["train_supervision_steps"] = float(metrics["supervision_steps"])
        else:
          metrics = compiled(*args)
          result["eval_steps"] = len(metrics["exact_by_step"])
  return result


# -------------------------------------------------------------------------- parent side


def run_point(cycles: int, supervision_steps: int) -> list[dict]:
  return [harness.child("measure_single", dict(
      cycles=cycles, supervision_steps=supervision_steps, latent_steps=_LATENT_STEPS.value,
      net_layers=_NET_LAYERS.value, gradient=_GRADIENT.value, halting=_HALTING.value,
      d_model=_D_MODEL.value, num_heads=_NUM_HEADS.value, d_ff=_D_FF.value,
      puzzle_size=_PUZZLE_SIZE.value, batch_size=_BATCH_SIZE.value, execute=_EXECUTE.value))
      for _ in range(_REPEATS.value)]


def main(argv):
  del argv
  start = time.perf_counter()
  load_start = os.getloadavg()
  points = ([("T", int(t), _FIXED_SUPERVISION.value) for t in _CYCLES.value if t.strip()] +
            [("N_sup", _FIXED_CYCLES.value, int(s)) for s in _SUPERVISION.value if s.strip()])

  import jax  # only for the version string in the report
  n, k = _LATENT_STEPS.value, _NET_LAYERS.value
  header = [
      "# Compile time of the deep-supervision train step vs. cycles T and supervision steps",
      "",
      f"Command: `{harness.command()}`",
      "",
      f"jax {jax.__version__}, backend {jax.default_backend()}, "
      f"{os.cpu_count()} CPU cores visible.",
      "",
      f"Model: puzzle family (TRM), d_model={_D_MODEL.value}, num_heads={_NUM_HEADS.value}, "
      f"d_ff={_D_FF.value}, net_layers={k}, latent_steps n={n}, gradient={_GRADIENT.value}, "
      f"halting={_HALTING.value}; {_PUZZLE_SIZE.value}x{_PUZZLE_SIZE.value} Sudoku batch "
      f"{_BATCH_SIZE.value} x {_PUZZLE_SIZE.value ** 2} cells. Programs: `train.make_steps`'s "
      "jitted `train_fn` (deep supervision: a `lax.while_loop` of up to N_sup optimizer "
      "updates) and `eval_fn` (a `lax.scan` of `eval_supervision_steps` = N_sup steps).",
      "",
      f"Each point: {_REPEATS.value} fresh process(es), persistent compilation cache off; "
      "times in seconds (median (min-max) over repeats). `lower` = `jitted.lower(...)` "
      "(trace + lowering to StableHLO), `compile` = `lowered.compile()` (XLA). Applied = "
      "layers per supervision step T x (n + 1) x net_layers (no-grad: the detached prefix). "
      "HLO ops = instructions of the compiled (optimized) HLO text.",
      "",
  ]
  cols = ["varied", "T", "N_sup", "applied layers / step (no-grad)", "train lower s",
          "train compile s", "train HLO ops", "eval lower s", "eval compile s", "eval HLO ops"]
  rows = []
  for varied, cycles, sup in points:
    results = run_point(cycles, sup)
    r0 = results[0]
    pick = lambda key: [r[key] for r in results]  # noqa: E731
    rows.append([varied, str(cycles), str(sup),
                 f"{r0['applied_layers']} ({r0['no_grad_layers']})",
                 harness.median_range(pick("train_lower_s")),
                 harness.median_range(pick("train_compile_s")), str(r0["train_hlo_ops"]),
                 harness.median_range(pick("eval_lower_s")),
                 harness.median_range(pick("eval_compile_s")), str(r0["eval_hlo_ops"])])
    extra = (f" loss {r0['train_loss']:.3f}, {r0['train_supervision_steps']:.2f} supervision "
             "steps run" if "train_loss" in r0 else "")
    print(f"[{time.perf_counter() - start:6.1f}s] T={cycles} N_sup={sup}: train lower "
          f"{statistics.median(pick('train_lower_s')):.2f}s compile "
          f"{statistics.median(pick('train_compile_s')):.2f}s, eval compile "
          f"{statistics.median(pick('eval_compile_s')):.2f}s{extra}", file=sys.stderr)

  table = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
  table += ["| " + " | ".join(row) + " |" for row in rows]
  elapsed = time.perf_counter() - start
  load_end = os.getloadavg()
  footer = ["", f"Total benchmark wall time: {elapsed:.1f} s. 1-min load average at start "
            f"{load_start[0]:.2f}, at end {load_end[0]:.2f} (on {os.cpu_count()} cores; "
            "other processes on the machine inflate and spread the times).", ""]
  harness.report("\n".join(header + table + footer), _OUT.value)


if __name__ == "__main__":
  harness.run(main)
