"""Model construction and accounting: ``build(config)`` returns the Flax module.

``build(config).apply({"params": params}, batch, deterministic=True)`` returns logits; see
``xlps.models.transformer`` for the batch keys of each family.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from xlps import sharing
from xlps.config import ModelSpec
from xlps.models.transformer import FAMILY_MODULES

__all__ = ["build", "spec_of", "example_batch", "init_params", "param_shapes",
           "component_uses", "summarize"]


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
  return FAMILY_MODULES[spec.family](spec)


def example_batch(spec: ModelSpec, batch_size: int = 2, length: int = 16,
                  seed: int = 0) -> dict[str, jax.Array]:
  """A random batch with the keys the family expects (for init, tests and benchmarks)."""
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  tokens = lambda k: jax.random.randint(k, (batch_size, length), 1, spec.vocab_size)  # noqa
  if spec.family == "decoder_lm":
    return {"inputs": tokens(k1)}
  if spec.family == "encoder_mlm":
    batch = {"input_ids": tokens(k1), "attention_mask": jnp.ones((batch_size, length), jnp.int32)}
    if spec.type_vocab_size:
      batch["token_type_ids"] = jnp.zeros((batch_size, length), jnp.int32)
    return batch
  return {"inputs": tokens(k1), "targets": tokens(k2)}


def init_params(config: Mapping | ModelSpec, seed: int = 0, batch_size: int = 1,
                length: int = 8):
  """Boxed parameters (``nn.LogicallyPartitioned`` leaves) of a freshly initialised model."""
  spec = spec_of(config)
  batch = example_batch(spec, batch_size, min(length, spec.max_len))
  return build(spec).init(jax.random.PRNGKey(seed), batch)["params"]


def param_shapes(config: Mapping | ModelSpec) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Path -> shape of every parameter, via ``jax.eval_shape`` (no memory, no FLOPs)."""
  spec = spec_of(config)
  abstract = jax.eval_shape(lambda: nn.unbox(init_params(spec)))
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def component_uses(spec: ModelSpec) -> list[sharing.ComponentUse]:
  """Where each component's stacked parameters live and which plans apply them."""
  uses = []
  if spec.family == "encoder_decoder" and spec.tie_encoder_decoder:
    enc, dec = spec.stack_plans("encoder"), spec.stack_plans("decoder")
    for comp in ("attention", "mlp"):
      uses.append(sharing.ComponentUse(("encoder", "layers", comp), comp,
                                       (enc[comp], dec[comp])))
    uses.append(sharing.ComponentUse(("encoder", "layers", "norms"), "encoder/norms",
                                     (enc["norms"],)))
    uses.append(sharing.ComponentUse(("encoder", "layers", "cross_attention"),
                                     "decoder/cross_attention", (dec["cross_attention"],)))
    uses.append(sharing.ComponentUse(("encoder", "layers", "decoder_norms"), "decoder/norms",
                                     (dec["norms"],)))
    return uses
  prefix = spec.family == "encoder_decoder"
  for stack in spec.stacks:
    for comp, plan in spec.stack_plans(stack).items():
      label = f"{stack}/{comp}" if prefix else comp
      uses.append(sharing.ComponentUse((stack, "layers", comp), label, (plan,)))
  return uses


def slot_tables(spec: ModelSpec) -> dict[str, list[int]]:
  """Component name -> the N slot indices it uses (``stack/component`` for enc-dec)."""
  prefix = spec.family == "encoder_decoder"
  return {(f"{stack}/{comp}" if prefix else comp): list(plan.slots)
          for stack in spec.stacks for comp, plan in spec.stack_plans(stack).items()}


def summarize(config: Mapping | ModelSpec, seq_len: int | None = None) -> dict:
  """Unique / applied parameters, training FLOPs per token and slot tables.

  Attention-score FLOPs follow PaLM's count (``12 x layers x d_attn x seq_len`` per token,
  no causal discount). For encoder_decoder, FLOPs are per target token with the source
  as long as the target.
  """
  spec = spec_of(config)
  seq_len = seq_len or spec.max_len
  d_attn = spec.num_heads * spec.head_dim
  attention_layers = sum(p["attention"].num_layers for p in
                         (spec.stack_plans(s) for s in spec.stacks))
  if spec.family == "encoder_decoder":
    attention_layers += spec.num_decoder_layers  # cross-attention
  output_matmul = spec.vocab_size * spec.embed_dim if spec.tie_embeddings else 0
  result = sharing.account(param_shapes(spec), component_uses(spec),
                           attention_flops_per_token=12 * attention_layers * d_attn * seq_len,
                           output_matmul_params=output_matmul)
  result["seq_len"] = seq_len
  result["slots"] = slot_tables(spec)
  return result
