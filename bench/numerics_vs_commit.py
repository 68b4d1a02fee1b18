"""Same numbers as another commit: losses, gradients, updated parameters and decoding of
every family and depth method, compared bitwise against a git commit's code.

A refactor of the engine must not change what a model computes. This runs one fixed case
list (tiny models, fixed inputs, two AdamW steps with dropout, one deterministic
evaluation, greedy cached decoding for decoder LMs) once with the code of ``--commit``
(checked out into a temporary git worktree) and once with the working tree, each in its
own process, and prints per case the largest absolute difference of every output kind.

  python -m bench.numerics_vs_commit --commit=1caac0f
  python -m bench.numerics_vs_commit --commit=1caac0f --cases=loop_adapter,act_accumulate

Output: one line per case, ``bitwise`` or the max |difference| per output, and a summary.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile

from absl import app, flags

ROOT = pathlib.Path(__file__).resolve().parents[1]

_COMMIT = flags.DEFINE_string("commit", None, "The git commit to compare against.")
_CASES = flags.DEFINE_list("cases", [], "Case names to run (default: all of CASES).")
_DUMP = flags.DEFINE_string("dump", None, "Internal: write this tree's outputs to this .npz.")

_LOOP = {"loop.prelude": 1, "loop.core": 2, "loop.coda": 1, "num_layers": 8}
# name -> model overrides (dotted keys) on a tiny decoder LM unless "family" says otherwise.
CASES: dict[str, dict] = {
    "decoder_plain": {},
    "decoder_albert": {"sharing.num_unique": 1},
    "decoder_cycle_rev": {"sharing.num_unique": 3, "sharing.order": "cycle_rev"},
    "decoder_cross_layer_kv": {"kv_sharing.policy": "cross_layer", "kv_sharing.group_size": 2},
    "decoder_remat_groups": {"remat_policy": "full", "remat_group_size": 2},
    "encoder_mlm_albert": {"family": "encoder_mlm", "sharing.num_unique": 1,
                           "norm_position": "post"},
    "encoder_decoder_tied": {"family": "encoder_decoder", "tie_encoder_decoder": True,
                             "num_layers": 3},
    "act_accumulate": {"act.enabled": True, "act.halting_bias_init": -1.0,
                       "sharing.num_unique": 1},
    "act_interpolate": {"act.enabled": True, "act.update_rule": "interpolate",
                        "act.coordinates": False, "sharing.num_unique": 1},
    "loop_add": {**_LOOP, "loop.inject": "add"},
    "loop_adapter_random": {**_LOOP, "loop.inject": "adapter", "loop.init_state": "random",
                            "loop.train_iterations": "uniform", "loop.mean_iterations": 2,
                            "loop.backprop_iterations": 1},
    "loop_zeros_poisson": {**_LOOP, "loop.inject": "add", "loop.init_state": "zeros",
                           "loop.train_iterations": "poisson_lognormal",
                           "loop.mean_iterations": 2, "loop.eval_iterations": 2},
    "loop_exit": {**_LOOP, "loop.inject": "add", "loop.exit_threshold": 0.5},
    "loop_lora": {**_LOOP, "loop.inject": "add", "lora.rank": 2},
    "routing_expert_residual": {**_LOOP, "routing.kind": "expert_choice",
                                "routing.inference": "threshold"},
    "routing_expert_interpolate": {**_LOOP, "routing.kind": "expert_choice",
                                   "routing.gating": "interpolate"},
    "routing_token_residual": {**_LOOP, "routing.kind": "token_choice", "loop.inject": "add"},
    "routing_token_interpolate": {**_LOOP, "routing.kind": "token_choice",
                                  "routing.gating": "interpolate"},
}


def _model_config(overrides: dict):
  from xlps import config as config_lib
  m = config_lib.model_config()
  sizes = {"vocab_size": 32, "d_model": 16, "num_heads": 4, "d_ff": 32, "max_len": 16,
           "num_layers": 4, "dropout_rate": 0.1}
  for key, value in {**sizes, **overrides}.items():
    node = m
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return m


def _batch(spec, seed: int):
  import jax
  import jax.numpy as jnp
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  shape = (4, 16)
  tokens = jax.random.randint(keys[0], shape, 1, spec.vocab_size)
  batch = {"inputs": tokens, "targets": jax.random.randint(keys[1], shape, 1, spec.vocab_size),
           "weights": (jax.random.uniform(keys[2], shape) < 0.8).astype(jnp.float32)}
  if spec.family == "encoder_mlm":
    batch["input_mask"] = jnp.ones(shape, jnp.int32).at[:, -3:].set(0)
  return batch


def dump(path: str, names: list[str]) -> None:
  """Runs every case in this process's code and writes the outputs to ``path``."""
  import jax
  import numpy as np
  import optax

  from xlps import models, train
  print(f"xlps from {models.__file__}", flush=True)
  from xlps import generate as generate_lib

  out = {}
  for name in names:
    spec = models.spec_of(_model_config(CASES[name]))
    model = models.build(spec)
    optimizer = optax.adamw(1e-2)
    params = jax.tree.map(lambda b: b.value if hasattr(b, "value") else b,
                          models.init_params(spec, seed=0, length=16),
                          is_leaf=lambda b: hasattr(b, "value"))
    state = train.state_of(params, optimizer, 0)
    step = jax.jit(lambda s, b: train.train_step(s, b, model=model, optimizer=optimizer))
    grad = jax.jit(jax.grad(lambda p, b: train.loss_and_metrics(
        train.apply_model(model, p, b, deterministic=True)[0], b["targets"], b["weights"])[0]))
    for i in range(2):
      state, metrics = step(state, _batch(spec, i))
      for k, v in metrics.items():
        out[f"{name}/step{i}/metric/{k}"] = np.asarray(v)
    grads = grad(state.params, _batch(spec, 7))
    for tree, kind in ((state.params, "param"), (grads, "grad")):
      for path_, leaf in jax.tree_util.tree_leaves_with_path(tree):
        out[f"{name}/{kind}/{jax.tree_util.keystr(path_)}"] = np.asarray(leaf)
    evaluated = jax.jit(lambda p, b: train.eval_step(p, b, model=model))(state.params,
                                                                         _batch(spec, 9))
    for k, v in evaluated.items():
      out[f"{name}/eval/{k}"] = np.asarray(v)
    if spec.family == "decoder_lm" and spec.routing is None or (
        spec.routing is not None and spec.routing.inference == "threshold"):
      generated = generate_lib.LMGenerator(spec, 4, return_logits=True)(
          state.params, [[3, 4, 5], [6, 7, 8, 9, 10]])
      out[f"{name}/decode/tokens"] = np.asarray(generated.tokens)
      out[f"{name}/decode/logits"] = np.asarray(generated.logits)
  np.savez(path, **out)


def _run_dump(code_root: pathlib.Path, path: str, names: list[str]) -> None:
  """Runs ``dump`` with ``code_root``'s xlps: this file run by path, so neither the current
  directory nor the editable install shadows PYTHONPATH."""
  env = {**os.environ, "PYTHONPATH": str(code_root), "JAX_PLATFORMS": "cpu"}
  subprocess.run([sys.executable, __file__, f"--dump={path}", f"--cases={','.join(names)}"],
                 cwd=code_root, env=env, check=True)


def main(argv):
  del argv
  names = _CASES.value or list(CASES)
  unknown = [n for n in names if n not in CASES]
  if unknown:
    raise app.UsageError(f"--cases: unknown {unknown}; valid: {', '.join(CASES)}")
  if _DUMP.value:
    dump(_DUMP.value, names)
    return
  if not _COMMIT.value:
    raise app.UsageError("--commit is required (e.g. --commit=main~3)")
  import numpy as np
  with tempfile.TemporaryDirectory() as tmp:
    worktree = pathlib.Path(tmp) / "base"
    subprocess.run(["git", "worktree", "add", "--detach", str(worktree), _COMMIT.value],
                   cwd=ROOT, check=True, capture_output=True)
    try:
      _run_dump(worktree, f"{tmp}/base.npz", names)
      _run_dump(ROOT, f"{tmp}/new.npz", names)
      base, new = np.load(f"{tmp}/base.npz"), np.load(f"{tmp}/new.npz")
      _report(names, dict(base), dict(new))
    finally:
      subprocess.run(["git", "worktree", "remove", "--force", str(worktree)], cwd=ROOT,
                     check=False)


def _report(names: list[str], base: dict, new: dict) -> None:
  import numpy as np
  bitwise = 0
  for name in names:
    keys = sorted(k for k in base if k.startswith(name + "/"))
    missing = sorted(set(keys) ^ {k for k in new if k.startswith(name + "/")})
    worst: dict[str, float] = {}
    for k in keys:
      if k not in new:
        continue
      kind = k.split("/")[1] if not k.split("/")[1].startswith("step") else "train"
      a, b = base[k], new[k]
      diff = 0.0 if np.array_equal(a, b) else float(np.max(np.abs(
          a.astype(np.float64) - b.astype(np.float64))))
      worst[kind] = max(worst.get(kind, 0.0), diff)
    same = not missing and all(d == 0 for d in worst.values())
    bitwise += same
    detail = "bitwise" if same else " ".join(f"{k}={v:.3g}" for k, v in worst.items())
    print(f"{name:28s} {len(keys):4d} arrays  {detail}"
          + (f"  MISSING/EXTRA: {missing[:4]}" if missing else ""))
  print(f"{bitwise}/{len(names)} cases bitwise equal")


if __name__ == "__main__":
  app.run(main)
