"""AdamW weight decay is decided by what a parameter is, not by its rank."""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from configs import default, transformer
from xlps import models, train

from helpers import small_albert, tiny


def is_norm_or_bias(path: tuple[str, ...]) -> bool:
  """Independent of DECAYED_LEAVES: any leaf under a norm module, or any bias."""
  return path[-1] == "bias" or any(part == "norms" or part == "decoder_norms" or
                                   part == "norm" or part.endswith("_norm") for part in path)


def decay_table(config) -> dict[tuple[str, ...], bool]:
  mask = train.decay_mask(nn.unbox(models.init_params(config)))
  return {tuple(k.key for k in path): bool(v)
          for path, v in jax.tree_util.tree_flatten_with_path(mask)[0]}


CASES = {
    "tied_m1": lambda: tiny(num_layers=4),
    "sequence_m2": lambda: tiny(num_layers=4, sharing={"num_unique": 2, "order": "sequence"}),
    "per_component": lambda: tiny(num_layers=4, sharing={"num_unique": 1, "mlp": {
        "num_unique": 4, "order": "sequence"}, "norms": {"num_unique": 2}}),
    "enc_dec_tied": lambda: tiny("encoder_decoder", num_layers=2, tie_encoder_decoder=True,
                                 sharing={"num_unique": 2, "order": "sequence"}),
    "albert_mlm_groups2": lambda: small_albert(pooler=True, sharing={
        "num_unique": 2, "order": "sequence"}).model,
}


@pytest.mark.parametrize("case", CASES)
def test_decay_mask_by_parameter_kind(case):
  config = CASES[case]()
  table = decay_table(config)
  shapes = models.param_shapes(config)
  assert set(table) == set(shapes)
  for path, decayed in table.items():
    assert decayed == (not is_norm_or_bias(path)), (path, shapes[path])
  # The cases exercise what the old rank rule got wrong: stacked (M, d) biases and norm
  # scales, and (heads, head_dim) attention biases even with M = 1.
  wrong_by_rank = [p for p in table if (len(shapes[p]) > 1) != table[p]]
  assert wrong_by_rank, "case does not distinguish kind from rank"


def test_decay_applies_to_kernels_only():
  """One AdamW step with zero gradients: only decayed leaves move, by lr * wd * value."""
  config = default.get_config("cycle")
  config.model.update(d_model=16, num_heads=2, d_ff=32, max_len=16)
  config.train.update(warmup_steps=0, weight_decay=0.5, learning_rate=0.1, grad_clip_norm=0.0)
  params = nn.unbox(models.init_params(config.model))
  params = jax.tree.map(lambda x: x + 0.3, params)  # biases and norms away from 0 / 1
  opt = train.make_optimizer(config.train)
  updates, _ = opt.update(jax.tree.map(np.zeros_like, params), opt.init(params), params)
  new = optax.apply_updates(params, updates)
  for (path, before), after in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                   jax.tree.leaves(new)):
    keys = tuple(k.key for k in path)
    expected = before * (1 - 0.1 * 0.5) if not is_norm_or_bias(keys) else before
    np.testing.assert_allclose(after, expected, rtol=1e-6, err_msg=str(keys))


def test_unknown_parameter_kind_is_a_clear_error():
  with pytest.raises(ValueError, match="decoder/mystery has no weight-decay rule"):
    train.decay_mask({"decoder": {"mystery": np.zeros((2, 2))}})


def test_tied_encoder_decoder_config_masks():
  config = transformer.get_config("tied,runlocal").model
  table = decay_table(config)
  assert table[("encoder", "layers", "decoder_norms", "mlp", "scale")] is False
  assert table[("encoder", "layers", "cross_attention", "query", "kernel")] is True
