"""xlps vs HuggingFace PyTorch eager: one training step on identical shapes, side by side.

Workloads (float32, no dropout, exact erf GELU, batch 8 x 128, AdamW with weight decay on
kernels and embeddings only, global-norm clipping at 1.0):

- ``albert``: ALBERT-base MLM (vocab 30000, E 128, H 768, 12 applied layers sharing one
  set, 15% of positions scored) against ``transformers.AlbertForMaskedLM``.
- ``decoder``: a weight-tied decoder LM (vocab 32000, H 768, 12 heads, FFN 3072, pre-LN,
  learned positions, tied output, 12 applied layers sharing one block) against
  ``transformers.GPT2LMHeadModel`` whose 12 blocks are one module (true weight tying in
  PyTorch: the optimizer updates one block).

Every measurement runs in a fresh process; rounds alternate the implementations (PyTorch,
then each xlps source tree) so machine noise hits them alike. Each round also measures the
float32 matmul ceiling (best of 2048^3 matmuls in JAX) in its own process; MFU is model
FLOPs (``xlps.models.summarize``: 6 x applied params + attention, per token) per second
over that ceiling. xlps reports trace/lower, cold compile, compile from the persistent
cache, and first step separately from the steady-state median.

    .venv/bin/python -m bench.step_vs_torch --out=bench/step_vs_torch.md
    # before/after a change, in one run: xlps from another source tree as a second column
    git worktree add /tmp/xlps_before <commit>
    .venv/bin/python -m bench.step_vs_torch --before=/tmp/xlps_before --out=bench/step_vs_torch.md
    # quick check: one round, one timed step, one workload
    .venv/bin/python -m bench.step_vs_torch --workloads=decoder --rounds=1 --steps=1
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import flags

from bench import harness
from bench.workloads import (BATCH, CLIP, LR, SEQ, SHAPES, WEIGHT_DECAY, batch_arrays,
                             xlps_config, xlps_setup)

_WORKLOADS = flags.DEFINE_list("workloads", ["albert", "decoder"], "Workloads to measure.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps per process (after one).")
_BEFORE = flags.DEFINE_string("before", "", "Another xlps source tree, measured alongside.")
_VARIANTS = flags.DEFINE_string(
    "variants", "", "Semicolon-separated model overrides measured as extra xlps rows, e.g. "
    "'remat_policy=dots_saveable'.")
_OUT = flags.DEFINE_string("out", "", "Also write the markdown report here.")

ROOT = harness.ROOT


# ------------------------------------------------------------------------------ children


def run_xlps(workload: str, steps: int, overrides: str = "") -> dict:
  import jax
  cache = tempfile.mkdtemp(prefix="xlps_bench_cache_")
  jax.config.update("jax_compilation_cache_dir", cache)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  from xlps import models, partitioning

  config = xlps_config(workload)
  for item in filter(None, overrides.split(",")):  # model key=value (str keys only)
    key, _, value = item.partition("=")
    config.model[key] = value
  spec, setup, batch, mesh, rules = xlps_setup(workload, config)
  state = setup.state
  jax.block_until_ready(state)
  fn = setup.train_fn
  t0 = time.perf_counter()
  with partitioning.activate(mesh, rules):
    lowered = fn.lower(state, batch)
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  jax.clear_caches()
  with partitioning.activate(mesh, rules):
    t3 = time.perf_counter()
    compiled = fn.lower(state, batch).compile()  # served from the persistent cache
    t4 = time.perf_counter()
  mem = compiled.memory_analysis()
  with partitioning.activate(mesh, rules):
    state, metrics, times = harness.timed_steps(compiled, state, batch, steps + 1)
  return {"lower_s": t1 - t0, "compile_s": t2 - t1, "cached_lower_compile_s": t4 - t3,
          "first_step_s": times[0], "steps_s": times[1:], "loss": float(metrics["loss_sum"] /
                                                                         metrics["tokens"]),
          "temp_mib": mem.temp_size_in_bytes / 2**20 if mem else None,
          "flops_per_token": models.summarize(spec, SEQ)["flops_per_token"]}


def torch_model(workload: str):
  import torch
  import transformers
  shape = SHAPES[workload]
  if workload == "albert":
    cfg = transformers.AlbertConfig(
        vocab_size=shape["vocab"], embedding_size=shape["embed"], hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        intermediate_size=shape["ffn"], hidden_act="gelu", hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, classifier_dropout_prob=0.0,
        max_position_embeddings=512, layer_norm_eps=1e-12)
    return transformers.AlbertForMaskedLM(cfg), cfg
  cfg = transformers.GPT2Config(
      vocab_size=shape["vocab"], n_positions=512, n_embd=shape["hidden"],
      n_layer=shape["layers"], n_head=shape["heads"], n_inner=shape["ffn"],
      activation_function="gelu", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
      use_cache=False)
  model = transformers.GPT2LMHeadModel(cfg)
  block = model.transformer.h[0]
  model.transformer.h = torch.nn.ModuleList([block] * shape["layers"])  # one tied block
  return model, cfg


def run_torch(workload: str, steps: int) -> dict:
  import torch
  torch.manual_seed(0)
  model, cfg = torch_model(workload)
  model.train()
  decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n
                                                          or ".ln_" in n or "norm" in n.lower())]
  rest = [p for n, p in model.named_parameters() if all(p is not q for q in decay)]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": WEIGHT_DECAY},
                           {"params": rest, "weight_decay": 0.0}], lr=LR, eps=1e-8)
  b = batch_arrays(workload)
  inputs = torch.from_numpy(b["inputs"]).long()
  if workload == "albert":
    labels = torch.where(torch.from_numpy(b["weights"]) > 0, torch.from_numpy(b["targets"]).long(),
                         torch.tensor(-100))
  else:
    labels = inputs

  def step():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=inputs, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    return float(loss)

  times = []
  for _ in range(steps + 1):
    start = time.perf_counter()
    loss = step()
    times.append(time.perf_counter() - start)
  return {"first_step_s": times[0], "steps_s": times[1:], "loss": loss,
          "unique_params": sum(p.numel() for p in model.parameters()),
          "attn_implementation": getattr(cfg, "_attn_implementation", None),
          "threads": torch.get_num_threads(), "torch": torch.__version__,
          "transformers": __import__("transformers").__version__}


def run_ceiling() -> dict:
  import jax
  import jax.numpy as jnp
  n = 2048
  x = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  best = float("inf")
  for _ in range(8):
    start = time.perf_counter()
    f(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return {"flops": 2 * n ** 3 / best, "jax": jax.__version__}


# -------------------------------------------------------------------------------- parent


def child(fn: str, tree: str = ROOT, **kwargs) -> dict:
  """``fn(**kwargs)`` in a fresh process, with xlps from ``tree``, without ``XLA_FLAGS``."""
  return harness.child(fn, kwargs, tree=tree, drop_xla_flags=True)


def git_rev(tree: str) -> str:
  out = subprocess.run(["git", "-C", tree, "rev-parse", "--short", "HEAD"], capture_output=True,
                       text=True).stdout.strip()
  dirty = subprocess.run(["git", "-C", tree, "status", "--porcelain", "--untracked-files=no"],
                         capture_output=True, text=True).stdout.strip()
  return out + ("+changes" if dirty else "")


def main(argv):
  del argv
  # name -> (source tree, model overrides)
  runs = {"xlps": (ROOT, "")}
  for variant in filter(None, _VARIANTS.value.split(";")):
    runs[f"xlps {variant}"] = (ROOT, variant)
  if _BEFORE.value:
    runs["xlps before"] = (os.path.abspath(_BEFORE.value), "")
  trees = [(name, tree) for name, (tree, _) in runs.items() if name in ("xlps", "xlps before")]
  names = ["torch", *runs]
  start, load0 = time.time(), os.getloadavg()[0]
  results = {w: {n: [] for n in names} for w in _WORKLOADS.value}
  ceilings = []
  for r in range(_ROUNDS.value):
    ceilings.append(child("run_ceiling")["flops"])
    for workload in results:
      order = names if r % 2 == 0 else names[::-1]
      for name in order:
        tree, overrides = runs.get(name, (ROOT, ""))
        if name == "torch":
          res = child("run_torch", workload=workload, steps=_STEPS.value)
        else:
          res = child("run_xlps", tree, workload=workload, steps=_STEPS.value, overrides=overrides)
        results[workload][name].append(res)
        print(f"[{time.time() - start:6.0f}s] round {r} {workload} {name}: median "
              f"{statistics.median(res['steps_s']):.3f}s loss {res['loss']:.4f}", file=sys.stderr)
  ceiling = statistics.median(ceilings)
  tokens = BATCH * SEQ
  torch_info = results[next(iter(results))]["torch"][0]
  lines = [
      "# xlps vs HuggingFace PyTorch eager: training step, side by side",
      "",
      f"Command: `{harness.command()}`",
      "",
      f"{os.cpu_count()} CPU cores; torch {torch_info['torch']} ({torch_info['threads']} threads, "
      f"attention `{torch_info['attn_implementation']}`), transformers "
      f"{torch_info['transformers']}; xlps trees: "
      + ", ".join(f"{n} = {git_rev(t)}" for n, t in trees) + ". "
      f"Batch {BATCH} x {SEQ}, float32, AdamW (lr {LR}, decay {WEIGHT_DECAY}), clip {CLIP}. "
      f"{_ROUNDS.value} alternating rounds x {_STEPS.value} timed steps per process.",
      "",
      f"float32 matmul ceiling (JAX, 2048^3, per round): "
      + ", ".join(f"{c / 1e9:.0f}" for c in ceilings) + f" GFLOP/s; median {ceiling / 1e9:.0f}.",
      "",
      "| workload | implementation | step s (median of round medians) | per-round medians | "
      "ratio to torch | tokens/s | MFU of ceiling | first step s | lower s | cold compile s | "
      "cached compile s | temp MiB | final loss |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for workload, by_name in results.items():
    flops = by_name[names[1]][0]["flops_per_token"]
    t_torch = statistics.median(statistics.median(r["steps_s"]) for r in by_name["torch"])
    for name in names:
      runs = by_name[name]
      rounds = [statistics.median(r["steps_s"]) for r in runs]
      med = statistics.median(rounds)
      cells = [workload, name, f"{med:.3f}", " / ".join(f"{x:.3f}" for x in rounds),
               f"{med / t_torch:.3f}", f"{tokens / med:.0f}",
               f"{tokens / med * flops / ceiling:.2f}",
               f"{statistics.median(r['first_step_s'] for r in runs):.2f}"]
      if name == "torch":
        cells += ["", "", "", ""]
      else:
        cells += [f"{statistics.median(r[k] for r in runs):.2f}"
                  for k in ("lower_s", "compile_s", "cached_lower_compile_s")]
        cells.append(f"{runs[0]['temp_mib']:.0f}")
      cells.append(f"{runs[-1]['loss']:.4f}")
      lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
  lines += [f"Model FLOPs per token: " + ", ".join(
      f"{w} {results[w][names[1]][0]['flops_per_token'] / 1e6:.0f} M" for w in results) + ". "
            "Ratio < 1: xlps is faster. `cached compile` = trace, lower and compile again after "
            "`jax.clear_caches()`, served from the persistent compilation cache.",
            "",
            f"Wall time {time.time() - start:.0f} s; 1-min load average {load0:.2f} at start, "
            f"{os.getloadavg()[0]:.2f} at end.", ""]
  harness.report("\n".join(lines), _OUT.value)


if __name__ == "__main__":
  harness.run(main)
