"""Recursify: turn a model with N distinct layers into M shared slots looped over N applied
layers, with optional per-applied-layer LoRA (Relaxed Recursive Transformers, Bae et al. 2025).

The source's *applied layer* i is whatever parameters its plan gives layer i (so an
unshared model, or one already partly shared). The target keeps N applied layers and
plans every component with ``num_unique = M`` and ``order``; slot s starts from source
layers chosen by ``init``:

* ``average``:  the mean of the source layers the target plan maps to s;
* ``stepwise``: one layer every N / M: source layer ``floor(s N / M)`` (middle_cycle: the
  first and last layers for their own slots, the middle slots stepping over the middle);
* ``lower``:    source layer s, the first M layers (middle_cycle: the last slot takes the
  last layer).

With ``lora_rank = r`` each applied layer i gets, on every targeted projection, the
rank-r truncated SVD of its residual ``W_i - W_slot(i)`` (``lora_init='svd'``: ``A = U_r
sqrt(S_r)``, ``B = sqrt(S_r) V_r^T``) and, with ``lora_bias``, the bias residual
``b_i - b_slot(i)``; or a fresh adapter (``'zero'``: B = 0, zero offsets: the tied model). Full rank reproduces every applied
layer's projections exactly; norms are shared unless ``unshared_norms`` keeps one per layer.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
import jax
import ml_collections
import numpy as np
from etils import epath

from xlps import config as config_lib
from xlps import models, sharing, storage
from xlps.config import ConfigError

INITS = ("average", "stepwise", "lower")
ORDERS = ("sequence", "cycle", "cycle_rev", "middle_cycle")
LORA_INITS = ("svd", "zero")


def source_layers(plan: sharing.Plan, init: str) -> list[list[int]]:
  """For each target slot, the source applied layers whose mean initialises it."""
  n, m = plan.num_layers, plan.num_unique
  if init == "average":
    return [[i for i in range(n) if plan.slots[i] == s] for s in range(m)]
  if plan.order == "middle_cycle" and m < n:
    middle = {"stepwise": lambda j: 1 + (j - 1) * (n - 2) // (m - 2), "lower": lambda j: j}[init]
    return [[0]] + [[middle(j)] for j in range(1, m - 1)] + [[n - 1]]
  if init == "stepwise":
    return [[s * n // m] for s in range(m)]
  return [[s] for s in range(m)]


def load_source(path: str) -> tuple[ml_collections.ConfigDict, dict]:
  """``(config, params)`` of an xlps workdir (its latest checkpoint) or an HF BERT / ALBERT
  ``save_pretrained`` directory."""
  from xlps import interop
  storage.check_filesystem(path, "from")
  if (epath.Path(path) / "checkpoints").is_dir():
    config, params, _ = interop.read_checkpoint(path)
    return config, params
  if not (epath.Path(path) / "config.json").is_file():
    what = "does not exist" if not epath.Path(path).exists() else (
        "holds neither checkpoints/ nor an HF config.json")
    raise ConfigError(f"--from={path!r} {what}; valid: an xlps workdir (its latest checkpoint) "
                      "or an HF BERT / ALBERT save_pretrained directory")
  try:
    from xlps.interop import huggingface  # torch and transformers: only for HF sources
  except ModuleNotFoundError as e:
    raise ConfigError(f"--from={path!r} is a Hugging Face directory, which needs the interop "
                      f"extra ({e.name} is missing): pip install 'xlps[interop]'") from None
  return huggingface.load_hf(path)


def _layer_leaf(stacked: np.ndarray, plan: sharing.Plan, layer: int) -> np.ndarray:
  return stacked if plan.num_unique == 1 else stacked[plan.slots[layer]]


def _check_source(spec: config_lib.ModelSpec) -> sharing.StackPlan:
  if len(spec.stacks) != 1:
    raise ConfigError(f"recursify takes a one-stack model (decoder_lm, encoder_mlm); the source "
                      f"is model.family={spec.family!r}")
  for name, value in (("lora.rank", spec.lora), ("loop.core", spec.loop), ("act.enabled", spec.act)):
    if value is not None:
      raise ConfigError(f"recursify takes a plain stack of layers; the source has model.{name} "
                        "set")
  return spec.stacks[0]


def target_config(config: ml_collections.ConfigDict, num_unique: int, order: str,
                  lora_rank: int = 0, lora_bias: bool = False,
                  lora_targets: str | None = None,
                  unshared_norms: bool = False) -> ml_collections.ConfigDict:
  """``config`` with every component planned by ``(num_unique, order)`` and LoRA set."""
  config = copy.deepcopy(config)
  m = config.model
  fresh = config_lib.sharing_config(num_unique, order)
  if unshared_norms:
    fresh.norms.num_unique, fresh.norms.order = m.num_layers, "sequence"
  m.sharing = fresh
  m.lora.rank, m.lora.bias = lora_rank, bool(lora_bias and lora_rank)
  if lora_targets is not None:
    m.lora.targets = lora_targets
  config_lib.ModelSpec.from_config(m)  # names the field of a bad M / order before any work
  return config


def recursify(config: ml_collections.ConfigDict, params: Mapping, num_unique: int, order: str,
              init: str = "average", lora_rank: int = 0, lora_init: str = "svd",
              lora_bias: bool = False, lora_targets: str | None = None,
              unshared_norms: bool = False, seed: int = 0
              ) -> tuple[ml_collections.ConfigDict, dict]:
  """``(config, params)`` of the recursive model made from ``(config, params)``; see the
  module docstring. ``seed`` draws the fresh parts (``lora_init='zero'``'s A)."""
  for field, value, valid in (("init", init, INITS), ("order", order, ORDERS),
                              ("lora_init", lora_init, LORA_INITS)):
    config_lib.check_choice(field, value, valid)
  source_spec = models.spec_of(config)
  source = _check_source(source_spec)
  new_config = target_config(config, num_unique, order, lora_rank, lora_bias, lora_targets,
                             unshared_norms)
  spec = models.spec_of(new_config)
  target = spec.stacks[0]
  fresh = jax.tree.map(np.asarray, models.nn.unbox(jax.jit(
      models.init_params, static_argnums=(0, 1))(spec, seed)))
  params = jax.tree.map(np.asarray, dict(params))
  out = {k: v for k, v in params.items() if k != source.owner}
  owner = dict(params[source.owner])
  source_plans = source.plans
  groups_out = {}
  for comp, group, plan in target.uses:
    src_group = next(g for c, g, _ in source.uses if c == comp)
    src_tree = owner[sharing.BLOCK_SCOPE][src_group]
    layers_of = source_layers(plan, init)

    def slot_value(leaf: np.ndarray, _plan=plan, _layers=layers_of, _src=source_plans[comp]):
      per_slot = [np.mean([_layer_leaf(leaf, _src, i) for i in layers], axis=0)
                  for layers in _layers]
      return per_slot[0] if _plan.num_unique == 1 else np.stack(per_slot)

    tree = jax.tree.map(slot_value, src_tree)
    if lora_rank:
      tree = _with_adapters(tree, src_tree, fresh[target.owner][sharing.BLOCK_SCOPE][group],
                            plan, source_plans[comp], lora_init)
    groups_out[group] = tree
  out[target.owner] = {**{k: v for k, v in owner.items() if k != sharing.BLOCK_SCOPE},
                       sharing.BLOCK_SCOPE: groups_out}
  expected = models.param_shapes(spec)
  got = {tuple(k.key for k in p): tuple(v.shape)
         for p, v in jax.tree_util.tree_flatten_with_path(out)[0]}
  if got != expected:
    raise AssertionError(f"recursified parameters {got} != the target structure {expected}")
  return new_config, out


def _with_adapters(tree: Mapping, src_tree: Mapping, fresh: Mapping, plan: sharing.Plan,
                   src_plan: sharing.Plan, lora_init: str) -> dict:
  """``tree`` (the slots) with the adapters of ``fresh`` filled in for every Dense."""
  out = {}
  for name, node in tree.items():
    if not isinstance(node, Mapping):
      out[name] = node
      continue
    node = dict(node)
    adapted = fresh.get(name, {})
    if isinstance(adapted, Mapping) and "lora_a" in adapted:
      node.update(_adapter(node, src_tree[name], adapted, plan, src_plan, lora_init))
    elif isinstance(adapted, Mapping):
      node = _with_adapters(node, src_tree[name], adapted, plan, src_plan, lora_init)
    out[name] = node
  return out


def _adapter(slots: Mapping, source: Mapping, fresh: Mapping, plan: sharing.Plan,
             src_plan: sharing.Plan, lora_init: str) -> dict[str, np.ndarray]:
  """One Dense's ``lora_a`` / ``lora_b`` (/ ``lora_bias``) for every applied layer."""
  n, rank = plan.num_layers, fresh["lora_a"].shape[-1]
  in_shape = fresh["lora_a"].shape[1:-1]
  out_shape = fresh["lora_b"].shape[2:]
  d_in, d_out = math.prod(in_shape), math.prod(out_shape)
  if lora_init == "zero":
    return {k: v for k, v in fresh.items() if k.startswith("lora")}
  result = {}
  if "lora_bias" in fresh:
    result["lora_bias"] = np.stack([
        _layer_leaf(source["bias"], src_plan, i) - _layer_leaf(slots["bias"], plan, i)
        for i in range(n)]).astype(np.float32)
  a = np.zeros((n, d_in, rank), np.float64)
  b = np.zeros((n, rank, d_out), np.float64)
  for i in range(n):
    residual = (_layer_leaf(source["kernel"], src_plan, i).astype(np.float64)
                - _layer_leaf(slots["kernel"], plan, i)).reshape(d_in, d_out)
    u, s, vt = np.linalg.svd(residual, full_matrices=False)
    r = min(rank, len(s))
    root = np.sqrt(s[:r])
    a[i, :, :r] = u[:, :r] * root
    b[i, :r] = root[:, None] * vt[:r]
  return {**result, "lora_a": a.reshape(n, *in_shape, rank).astype(np.float32),
          "lora_b": b.reshape(n, rank, *out_shape).astype(np.float32)}
