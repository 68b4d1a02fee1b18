"""The family registry: every family's entry is complete and its batches follow the one key
convention; a new family (here a prelude / looped core / coda LM) is one entry plus its
module; tying across stacks is plan data."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from helpers import configure, tiny
from xlps import config as config_lib
from xlps import data, families, models, sharing, train
from xlps.models import layers, transformer

FITTING_DATA = {"lm": dict(name="stdlib"), "mlm": dict(name="stdlib"),
                "seq2seq": dict(name="algorithmic", train_max_len=8, test_max_len=12,
                                num_train_examples=64, num_eval_examples=16),
                "puzzle": dict(name="sudoku", puzzle_size=4, puzzle_givens=6, seq_len=16,
                               tokenizer="none", num_train_examples=64, num_eval_examples=16)}


def full_config(model, data_dir, **data_overrides):
  config = config_lib.base_config()
  config.model = model
  config.data.update({"data_dir": str(data_dir), "seq_len": 32, **data_overrides})
  config.model.max_len = 32
  config.train.batch_size = 8
  return config


@pytest.mark.parametrize("name", sorted(families.FAMILIES))
def test_pipeline_batches_are_what_the_module_reads(name, data_dir):
  """Data and module agree on the keys, and every key is one of the documented ones."""
  family = families.FAMILIES[name]
  assert set(family.inputs + family.optional_inputs) <= set(families.BATCH_KEYS)
  config = full_config(tiny(family=name, vocab_size=260), data_dir,
                       **FITTING_DATA[family.layout])
  spec = config_lib.validate(config)
  batch = next(data.build(config).train_iter())
  assert set(family.inputs) | {"targets", "weights"} <= set(batch)
  assert set(batch) <= set(family.inputs + family.optional_inputs) | {"targets", "weights"}
  params = models.init_params(spec)
  logits = models.build(spec).apply({"params": params}, batch)
  assert logits.shape == (*batch["targets"].shape, spec.vocab_size)
  assert set(models.example_batch(spec)) == set(family.inputs)


class LoopedLM(transformer.FamilyModule):
  """prelude -> looped core -> coda: a Huginn-shaped causal LM written as a new family."""

  @nn.compact
  def __call__(self, batch, deterministic=True):
    valid = jnp.ones(batch["inputs"].shape, bool)
    mask = layers.make_attention_mask(valid, valid, causal=True)
    embedder = transformer.Embedder(self.spec, name="embedder")
    x = embedder(batch["inputs"], batch.get("positions"), None, self._embed_key(deterministic))
    stacks = self._stacks()
    for name in ("prelude", "core", "coda"):
      x = stacks[name](x, mask=mask, deterministic=deterministic)
    x = self._final_norm(x, "final_norm")
    return transformer.OutputHead(self.spec, name="head")(x, embedder)


LOOPED = families.Family(
    module="test_families:LoopedLM", layout="lm", inputs=("inputs",),
    optional_inputs=("positions",),
    stacks=lambda m: (families.StackSpec("prelude", 1, families.BLOCK),
                      families.StackSpec("core", m["num_layers"], families.BLOCK),
                      families.StackSpec("coda", 1, families.BLOCK)))


@pytest.mark.slow
def test_a_new_family_is_one_entry_plus_its_module(monkeypatch, data_dir):
  monkeypatch.setitem(families.FAMILIES, "looped_lm", LOOPED)
  config = full_config(tiny(family="looped_lm", num_layers=5, vocab_size=260), data_dir)
  spec = config_lib.validate(config)
  params = nn.unbox(models.init_params(spec))
  assert set(params) == {"embedder", "prelude", "core", "coda", "final_norm"}  # tied head

  # Accounting comes from the plans: the core's parameters count num_layers times.
  sizes = {path: math.prod(shape) for path, shape in models.param_shapes(spec).items()}
  summary = models.summarize(spec)
  assert summary["unique_params"] == sum(sizes.values())
  assert summary["applied_params"] == sum(n * (5 if path[0] == "core" else 1)
                                          for path, n in sizes.items())
  assert summary["slots"]["core/attention"] == [0] * 5

  # Its batches come from the existing "lm" layout, and it trains.
  batch = next(data.build(config).train_iter())
  config.train.warmup_steps = 0  # (warmup starts at learning rate 0)
  optimizer = train.make_optimizer(config.train)
  state = train.state_of(params, optimizer, config.seed)
  state, metrics = train.train_step(state, batch, model=models.build(spec), optimizer=optimizer)
  assert np.isfinite(float(metrics["loss_sum"])) and float(metrics["tokens"]) > 0
  assert float(optax.tree.norm(jax.tree.map(jnp.subtract, state.params, params))) > 0


def test_unknown_family_lists_the_registered_ones(monkeypatch):
  monkeypatch.setitem(families.FAMILIES, "looped_lm", LOOPED)
  with pytest.raises(config_lib.ConfigError, match=r"model.family='gpt' is not valid; .*looped_lm"):
    models.spec_of(tiny(family="gpt"))


def test_tying_is_two_components_naming_one_group():
  m = tiny(family="encoder_decoder", num_layers=4, num_decoder_layers=2,
           tie_encoder_decoder=True, sharing={"num_unique": 2})
  spec = models.spec_of(m)
  groups = spec.groups()
  attention = groups[("encoder", sharing.BLOCK_SCOPE, "attention")]
  assert [(stack, comp) for stack, comp, _ in attention.uses] == [("encoder", "attention"),
                                                                  ("decoder", "attention")]
  assert set(groups) == {("encoder", sharing.BLOCK_SCOPE, g) for g in
                         ("attention", "mlp", "norms", "cross_attention", "decoder_norms")}
  params = nn.unbox(models.init_params(spec))
  assert set(params["encoder"][sharing.BLOCK_SCOPE]) == {g[-1] for g in groups}
  assert "decoder" not in params


def test_tied_components_must_agree_on_num_unique():
  plan = lambda m: sharing.make_plan(4, m, "cycle")  # noqa: E731
  a = sharing.StackPlan("encoder", "encoder", (("attention", "attention", plan(2)),))
  b = sharing.StackPlan("decoder", "encoder", (("attention", "attention", plan(4)),))
  with pytest.raises(ValueError, match=r"encoder.attention.*decoder.attention.*encoder/layers/"
                                       r"attention.*same num_unique"):
    sharing.parameter_groups([a, b])


def test_a_stack_reads_groups_of_one_owner():
  with pytest.raises(ValueError, match="one owner"):
    sharing.stack_plan("decoder", 2, ("attention", "mlp"), {"attention": "encoder/attention"},
                       configure(config_lib.model_config()).sharing)
