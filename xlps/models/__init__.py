"""Model construction and accounting: ``build(config)`` returns the Flax module.

``build(config).apply({"params": params}, batch, deterministic=True)`` returns logits; the
batch keys of each family are in ``xlps.families``.
"""

from __future__ import annotations

from collections.abc import Mapping

import functools
import importlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from xlps import families, sharing
from xlps.config import ModelSpec
from xlps.models.controllers import loop as loop_controller

__all__ = ["build", "spec_of", "example_batch", "init_params", "param_shapes", "summarize",
           "kv_cache_bytes", "train_flops_per_token", "recursion_accounting"]


def spec_of(config: Mapping | ModelSpec) -> ModelSpec:
  """Validated ``ModelSpec`` from a full config (with ``.model``) or a model config."""
  if isinstance(config, ModelSpec):
    return config
  if "model" in config:
    return ModelSpec.from_config(config["model"], "model")
  return ModelSpec.from_config(config, "model")


def build(config: Mapping | ModelSpec) -> nn.Module:
  """The Flax module of ``config``'s family; validation happens here, before any trace."""
  spec = spec_of(config)
  module_name, _, class_name = families.FAMILIES[spec.family].module.partition(":")
  return getattr(importlib.import_module(module_name), class_name)(spec)


def example_batch(spec: ModelSpec, batch_size: int = 2, length: int = 16,
                  seed: int = 0) -> dict[str, jax.Array]:
  """Random token ids under each batch key the family needs (for init, tests, benchmarks)."""
  keys = families.FAMILIES[spec.family].inputs
  rngs = jax.random.split(jax.random.PRNGKey(seed), len(keys))
  return {key: jax.random.randint(rng, (batch_size, length), 1, spec.vocab_size)
          for key, rng in zip(keys, rngs)}


def init_params(config: Mapping | ModelSpec, seed: int = 0, batch_size: int = 1,
                length: int = 8):
  """Boxed parameters (``nn.LogicallyPartitioned`` leaves) of a freshly initialised model
  (one jitted program per spec and shape: op-by-op initialisation is many times slower)."""
  spec = spec_of(config)
  return _init_params(spec, seed, batch_size, min(length, spec.max_len))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _init_params(spec: ModelSpec, seed: int, batch_size: int, length: int):
  batch = example_batch(spec, batch_size, length)
  return build(spec).init(jax.random.PRNGKey(seed), batch)["params"]


def param_shapes(config: Mapping | ModelSpec) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Path -> shape of every parameter, via ``jax.eval_shape`` (no memory, no FLOPs)."""
  spec = spec_of(config)
  abstract = jax.eval_shape(lambda: nn.unbox(init_params(spec)))
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def slot_tables(spec: ModelSpec) -> dict[str, list[int]]:
  """Component name -> the N slot indices it uses (``stack/component`` when several stacks)."""
  prefix = len(spec.stacks) > 1
  return {(f"{stack.name}/{comp}" if prefix else comp): list(plan.slots)
          for stack in spec.stacks for comp, plan in stack.plans.items()}


def kv_cache_bytes(spec: ModelSpec) -> dict | None:
  """Decode cache size of a generating family (None for others), from the formula:

  per cached token ``2 x C x num_kv_heads x head_dim x dtype bytes + 1`` (K and V of the
  C entries of the decoder's K/V plan, plus its key-validity flag), and for encoder-decoders
  per source token ``2 x M_cross x num_kv_heads x head_dim x dtype bytes + 1`` (cross K/V
  of each cross-attention slot, computed once from the encoder output).
  """
  name = families.FAMILIES[spec.family].generates
  if name is None:
    return None
  stack = spec.stack(name)
  per_entry = 2 * spec.num_kv_heads * spec.head_dim * jnp.dtype(spec.dtype).itemsize
  kv = stack.kv
  result = {"policy": kv.policy, "entries": kv.num_entries, "applied_layers": stack.num_layers,
            "bytes_per_token": per_entry * kv.num_entries + 1}
  cross = stack.plans.get("cross_attention")
  if cross is not None:
    result["cross_entries"] = cross.num_unique
    result["cross_bytes_per_source_token"] = per_entry * cross.num_unique + 1
  return result


def layer_flops(spec: ModelSpec, stack: sharing.StackPlan, seq_len: int) -> int:
  """Training FLOPs per token of one applied layer of ``stack`` (6 x its matmul parameters
  plus attention scores, as ``summarize`` counts them)."""
  shapes = param_shapes(spec)
  kernels = 0
  for _, group, plan in stack.uses:
    path = (stack.owner, sharing.BLOCK_SCOPE, group)
    kernels += sum(math.prod(shape) for p, shape in shapes.items()
                   if p[:3] == path and p[-1] == "kernel") // plan.num_unique
    kernels += sum(math.prod(shape) for p, shape in shapes.items()
                   if p[:3] == path and p[-1] in sharing.LORA_MATMUL) // plan.num_layers
  attention = sum(comp in ("attention", "cross_attention") for comp, _, _ in stack.uses)
  return 6 * kernels + 12 * attention * spec.num_heads * spec.head_dim * seq_len


def adaptive_depth(spec: ModelSpec, flops_per_token: int, seq_len: int) -> dict | None:
  """Expected work under adaptive depth, for equal-FLOP comparisons (None at fixed depth).

  The engine always runs all N applied layers (masked or halted ones included), so
  ``flops_per_token`` is what runs; what a depth distribution *applies* is
  ``flops_per_token - (N - E[layers]) x layer_flops``. Looped: E[layers] = prelude + coda
  + core x E[train iterations] (the sampler's mean, clipped to [1, max]), and with
  truncated backprop (k = ``backprop_iterations``) the first max(r - k, 0) iterations of a
  sampled depth r get no gradient, so they apply only their forward pass, a third of
  ``layer_flops`` (2x parameters, not 6x): ``expected_train_flops_per_token`` subtracts
  E[max(r - k, 0)] x core x 2/3 ``layer_flops`` more, and the prelude's 2/3 too with
  probability P(r > k) when the cut also detaches it (``inject=none``,
  ``init_state=prelude``). Expectations are over 20000 draws of the train sampler.
  ``eval_flops_per_token`` counts ``eval_iterations`` at training cost. ACT: E[layers] is
  the measured mean ponder's N(t) (``train_ponder`` / ``eval_ponder`` logs), so only
  ``layer_flops`` is given here.
  """
  if spec.loop is None and spec.act is None:
    return None
  stack = spec.stacks[0] if spec.loop is not None else None
  per_layer = {s.name: layer_flops(spec, s, seq_len) for s in spec.stacks}
  result = {"layer_flops_per_token": per_layer}
  if spec.loop is not None and spec.routing is not None:
    # Routing: every layer runs (masked); expert-choice's capacities fix the mean depth,
    # token-choice's is measured (train_depth / eval_depth logs).
    result.update(routing=spec.routing.kind, max_iterations=spec.loop.max_iterations)
    if spec.routing.kind == "expert_choice":
      mean = sum(spec.routing.capacity)
      result.update(expected_train_iterations=mean,
                    expected_train_flops_per_token=flops_per_token - (
                        spec.loop.max_iterations - mean) * spec.loop.core * per_layer[stack.name])
  elif spec.loop is not None:
    lp, layer = spec.loop, per_layer[stack.name]
    draws = jax.vmap(lambda k: loop_controller.sample_iterations(k, lp))(
        jax.random.split(jax.random.PRNGKey(0), 20000))
    mean = float(draws.mean())
    cut = lp.backprop_iterations > 0  # k = 0: every iteration trains
    no_grad = float(jnp.maximum(draws - lp.backprop_iterations, 0).mean()) if cut else 0.0
    prelude_cut = (float((draws > lp.backprop_iterations).mean())
                   if cut and lp.inject == "none" and lp.init_state == "prelude" else 0.0)
    result.update(
        train_iterations=lp.train_iterations, max_iterations=lp.max_iterations,
        expected_train_iterations=mean, backprop_iterations=lp.backprop_iterations,
        expected_no_grad_iterations=no_grad, eval_iterations=lp.eval_iterations,
        expected_train_flops_per_token=flops_per_token - (lp.max_iterations - mean)
        * lp.core * layer - (no_grad * lp.core + prelude_cut * lp.prelude) * (layer - layer // 3),
        eval_flops_per_token=flops_per_token - (lp.max_iterations - lp.eval_iterations)
        * lp.core * per_layer[stack.name])
  return result


def recursion_accounting(spec: ModelSpec, flops_per_token: int, seq_len: int) -> dict | None:
  """FLOPs of latent recursion with deep supervision (``model.recursion``; None without).

  One supervision step applies ``applied_layers_per_step`` = T x (n + 1) x net_layers
  layers (``flops_per_token`` counts them all at training cost, 6x their matmul
  parameters plus attention scores). The first ``no_grad_layers`` of them run detached,
  forward only: a third of their ``layer_flops``. So one supervision step trains at
  ``step_flops_per_token`` = ``flops_per_token - no_grad_layers x (layer_flops -
  layer_flops / 3)``, plus, with ``halting='q_learning'``, the forward pass (no gradient)
  that bootstraps the Q target: ``halting_forward_flops_per_token`` = ``flops_per_token /
  3`` (every layer and the head, forward). A train step runs up to ``supervision_steps``
  supervision steps, each re-running the batch: ``train_flops_per_token`` =
  ``supervision_steps x step_flops_per_token`` at most (early halting runs fewer; the train
  step logs ``supervision_steps``, the mean steps run). ``eval_flops_per_token``:
  ``eval_supervision_steps`` forward passes (``flops_per_token / 3`` each).
  """
  r = spec.recursion
  if r is None:
    return None
  stack = spec.stacks[0]
  layer = layer_flops(spec, stack, seq_len)
  forward = flops_per_token // 3  # 6x / 12x counts: a forward pass is exactly a third
  halting_forward = forward if r.halting == "q_learning" else 0
  step = flops_per_token - r.no_grad_layers * (layer - layer // 3) + halting_forward
  return {"applied_layers_per_step": r.num_layers, "no_grad_layers": r.no_grad_layers,
          "gradient": r.gradient, "layer_flops_per_token": layer,
          "halting_forward_flops_per_token": halting_forward,
          "step_flops_per_token": step, "supervision_steps": r.supervision_steps,
          "train_flops_per_token": r.supervision_steps * step,
          "eval_supervision_steps": r.eval_supervision_steps,
          "eval_flops_per_token": r.eval_supervision_steps * forward}


def train_flops_per_token(summary: Mapping) -> float:
  """The model FLOPs of a train step per (target) token, what MFU counts: ``summarize``'s
  ``expected_train_flops_per_token`` where the depth distribution is known before training
  (a looped model's sampler and truncated backprop, expert-choice capacities), else
  ``flops_per_token`` (every applied layer; ACT and token-choice depths are measured).

  Latent recursion (``summary["recursion"]``): the FLOPs of a whole train step at the
  *maximum* ``supervision_steps`` (each supervision step re-runs the batch, its no-grad
  layers forward only). Early halting ends a batch's supervision steps sooner, so the real
  number is smaller by the ratio of the ``supervision_steps`` the train step reports (the
  mean steps run) to the maximum: MFU computed from this is an upper bound."""
  recursion = summary.get("recursion")
  if recursion:
    return recursion["train_flops_per_token"]
  depth = summary.get("adaptive_depth") or {}
  return depth.get("expected_train_flops_per_token", summary["flops_per_token"])


def summarize(config: Mapping | ModelSpec, seq_len: int | None = None) -> dict:
  """Unique / applied parameters, training FLOPs per token, slot tables, for generating
  families decode cache bytes (:func:`kv_cache_bytes`), under adaptive depth its expected
  work (:func:`adaptive_depth`) and with latent recursion the FLOPs of a supervision step
  and of a train step (:func:`recursion_accounting`).

  Attention-score FLOPs follow PaLM's count (``12 x layers x d_attn x seq_len`` per token,
  no causal discount). For encoder_decoder, FLOPs are per target token with the source
  as long as the target.
  """
  spec = spec_of(config)
  seq_len = seq_len or spec.max_len
  d_attn = spec.num_heads * spec.head_dim
  attention_layers = sum(plan.num_layers for stack in spec.stacks
                         for comp, plan in stack.plans.items()
                         if comp in ("attention", "cross_attention"))
  output_matmul = spec.vocab_size * spec.embed_dim if spec.tie_embeddings else 0
  result = sharing.account(param_shapes(spec), spec.groups().values(),
                           attention_flops_per_token=12 * attention_layers * d_attn * seq_len,
                           output_matmul_params=output_matmul)
  result["seq_len"] = seq_len
  result["slots"] = slot_tables(spec)
  result["kv_cache"] = kv_cache_bytes(spec)
  result["adaptive_depth"] = adaptive_depth(spec, result["flops_per_token"], seq_len)
  result["recursion"] = recursion_accounting(spec, result["flops_per_token"], seq_len)
  return result
