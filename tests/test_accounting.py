"""Parameter and FLOP accounting: tied counts are flat in N; ALBERT / BERT sizes."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from configs import albert, default, transformer
from xlps import models

from helpers import configure, tiny


def with_depth(config, n, m):
  """A copy of ``config`` applying ``n`` layers over ``m`` unique ones (order sequence)."""
  config = config.copy_and_resolve_references()
  configure(config.model, num_layers=n, sharing={"num_unique": m, "order": "sequence"})
  return config


def test_tied_unique_params_flat_in_depth():
  base = default.get_config("tied,runlocal")
  counts = [models.summarize(with_depth(base, n, 1)) for n in (1, 6, 48)]
  assert len({c["unique_params"] for c in counts}) == 1
  applied = [c["applied_params"] for c in counts]
  assert applied[0] < applied[1] < applied[2]
  # Applied parameters grow by exactly one layer's worth per applied layer.
  per_layer = (applied[1] - applied[0]) / 5
  assert applied[2] - applied[0] == pytest.approx(47 * per_layer)
  flops = [c["flops_per_token"] for c in counts]
  assert flops[2] - flops[0] == pytest.approx(47 / 5 * (flops[1] - flops[0]))


def test_unshared_counts_n_blocks():
  base = default.get_config("tied,runlocal")
  one = models.summarize(with_depth(base, 1, 1))
  tied6 = models.summarize(with_depth(base, 6, 1))
  unshared6 = models.summarize(with_depth(base, 6, 6))
  block = sum(r["unique_params"] for r in one["components"] if r["component"] != "other")
  assert unshared6["unique_params"] == one["unique_params"] + 5 * block
  assert unshared6["applied_params"] == unshared6["unique_params"] == tied6["applied_params"]
  assert unshared6["flops_per_token"] == tied6["flops_per_token"]


def test_counts_match_real_parameter_trees():
  # The accounting (from eval_shape) equals the leaves of an actually initialised model.
  config = transformer.get_config("cycle_rev,runlocal")
  params = nn.unbox(models.init_params(config))
  assert models.summarize(config)["unique_params"] == sum(
      int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_per_component_slots_in_summary():
  config = albert.get_config("base")
  config.model.sharing.mlp.num_unique = 12
  config.model.sharing.mlp.order = "sequence"
  summary = models.summarize(config)
  assert summary["slots"]["attention"] == [0] * 12
  assert summary["slots"]["mlp"] == list(range(12))
  rows = {r["component"]: r for r in summary["components"]}
  assert rows["mlp"]["unique_params"] == 12 * rows["mlp"]["applied_params"] // 12
  assert rows["attention"]["unique_params"] * 12 == rows["attention"]["applied_params"]


# Paper figures (Lan et al. 2019, Table 1) count the model with its pooler.
@pytest.mark.parametrize("variant,paper,tolerance", [
    ("base", 12e6, 0.02), ("large", 18e6, 0.02), ("xlarge", 60e6, 0.02),
    ("bert_base", 108e6, 0.02),
    ("xxlarge", 235e6, 0.06),  # the paper's 235M is ~5% above the released model (223M)
])
def test_albert_paper_sizes(variant, paper, tolerance):
  config = albert.get_config(variant)
  config.model.pooler = True
  unique = models.summarize(config)["unique_params"]
  assert abs(unique - paper) / paper < tolerance, unique


def test_albert_base_exact_hf_counts():
  # Hand-derived from HF's AlbertModel / AlbertForMaskedLM layouts (vocab 30000, E 128, H 768).
  embeddings = 30000 * 128 + 512 * 128 + 2 * 128 + 2 * 128
  mapping = 128 * 768 + 768
  layer = 4 * (768 * 768 + 768) + 2 * 768 + (768 * 3072 + 3072) + (3072 * 768 + 768) + 2 * 768
  mlm_head = 768 * 128 + 128 + 2 * 128 + 30000
  config = albert.get_config("base")
  assert models.summarize(config)["unique_params"] == embeddings + mapping + layer + mlm_head
  config.model.pooler = True
  pooler = 768 * 768 + 768
  assert models.summarize(config)["unique_params"] == (
      embeddings + mapping + layer + mlm_head + pooler)
  # AlbertModel (embeddings + shared layer + pooler, no MLM head) is albert-base-v2's 11,683,584.
  assert embeddings + mapping + layer + pooler == 11_683_584


def test_tied_encoder_decoder_counts():
  untied = transformer.get_config("vanilla,runlocal")
  tied = transformer.get_config("tied,runlocal")
  su, st = models.summarize(untied), models.summarize(tied)
  rows = {r["component"]: r for r in su["components"]}
  saved = rows["decoder/attention"]["unique_params"] + rows["decoder/mlp"]["unique_params"]
  assert st["unique_params"] == su["unique_params"] - saved
  assert st["applied_params"] == su["applied_params"]
  assert st["flops_per_token"] == su["flops_per_token"]


@pytest.mark.parametrize("family,overrides,by_hand", [
    # d 16, 4 heads, d_ff 32, vocab 32, seq 8. One layer's kernels: q, k, v, out 4 x 16 x 16
    # = 1024, FFN 16 x 32 + 32 x 16 = 1024, so 2048. Attention scores (PaLM): 12 x d_attn 16
    # x seq 8 = 1536 per attention layer.
    # 6 tied layers applied: 6 x (6 x 2048 + tied output 32 x 16 = 512) + 6 x 1536
    ("decoder_lm", {}, 6 * (6 * 2048 + 512) + 6 * 1536),
    # ALBERT shape, E 8, 2 layers: 6 x (E->H 8 x 16 + 2 x 2048 + head H->E 16 x 8 + tied
    # output 32 x 8) + 2 x 1536
    ("encoder_mlm", {"num_layers": 2, "embed_dim": 8},
     6 * (8 * 16 + 2 * 2048 + 16 * 8 + 32 * 8) + 2 * 1536),
    # 2 encoder layers, 3 decoder layers with cross-attention (4 x 16 x 16 = 1024 each), per
    # target token with an equally long source: 6 x (2 x 2048 + 3 x (2048 + 1024) + 512)
    # + (2 + 3 self + 3 cross) x 1536
    ("encoder_decoder", {"num_layers": 2, "num_decoder_layers": 3},
     6 * (2 * 2048 + 3 * (2048 + 1024) + 512) + 8 * 1536),
], ids=["decoder_lm", "encoder_mlm", "encoder_decoder"])
def test_flops_per_token_by_hand(family, overrides, by_hand):
  assert models.summarize(tiny(family, **overrides), seq_len=8)["flops_per_token"] == by_hand


# Looped by hand (tiny decoder_lm, seq 8): prelude 2, core 2 x up to 3 iterations, coda 1.
# A layer trains at 6 x 2048 + 1536 = 13824 FLOPs per token and runs forward only (no
# gradient) at 2 x 2048 + 4 x 16 x 8 = 4608; the tied output matmul is 6 x 512 = 3072.
LAYER, FORWARD, OUTPUT = 13824, 4608, 3072


@pytest.mark.parametrize("loop,by_hand", [
    ({"mean_iterations": 3}, 9 * LAYER + OUTPUT),
    # r = 3 > k = 1: the first 2 iterations run forward only, the last trains.
    ({"mean_iterations": 3, "backprop_iterations": 1},
     3 * LAYER + 2 * LAYER + 4 * FORWARD + OUTPUT),
    # r = k = 2 and r = 2 < k = 3: nothing is detached (max(r - k, 0) = 0); iteration 3 masked.
    ({"mean_iterations": 2, "backprop_iterations": 2}, 7 * LAYER + OUTPUT),
    ({"mean_iterations": 2, "backprop_iterations": 3}, 7 * LAYER + OUTPUT),
    # inject none, init_state prelude, r > k: the cut also detaches the prelude.
    ({"mean_iterations": 3, "backprop_iterations": 1, "inject": "none"},
     2 * FORWARD + LAYER + 2 * LAYER + 4 * FORWARD + OUTPUT),
], ids=["all_backprop", "r_above_k", "r_equals_k", "r_below_k", "prelude_detached"])
def test_truncated_iterations_train_at_forward_cost(loop, by_hand):
  """Applied train FLOPs (and what MFU counts): iterations before the truncation point (the
  first max(r - k, 0)) run forward only, 2x their parameters instead of 6x."""
  model = tiny("decoder_lm", 9)
  model.loop.update({"prelude": 2, "core": 2, "coda": 1, "inject": "add", **loop})
  summary = models.summarize(model, seq_len=8)
  assert summary["flops_per_token"] == 9 * LAYER + OUTPUT  # the masked scan runs all 9
  assert summary["adaptive_depth"]["expected_train_flops_per_token"] == by_hand
  assert models.train_flops_per_token(summary) == by_hand


def test_truncation_expectation_over_sampled_depths():
  """uniform over r = 1, 2, 3 with k = 1: E[r] = 2 and E[max(r - 1, 0)] = 1, so the core
  trains 2 x (2 - 1) layers and runs 2 x 1 forward only, in expectation."""
  model = tiny("decoder_lm", 9)
  model.loop.update(prelude=2, core=2, coda=1, inject="add", train_iterations="uniform",
                    mean_iterations=2, backprop_iterations=1)
  depth = models.summarize(model, seq_len=8)["adaptive_depth"]
  assert depth["expected_train_iterations"] == pytest.approx(2, rel=1e-2)
  assert depth["expected_no_grad_iterations"] == pytest.approx(1, rel=2e-2)
  assert depth["expected_train_flops_per_token"] == pytest.approx(
      3 * LAYER + 2 * LAYER + 2 * FORWARD + OUTPUT, rel=2e-3)


# Latent recursion by hand (tiny puzzle net, vocab 6, seq 8): one net layer applied
# T 2 x (n 2 + 1) = 6 times per supervision step. LAYER / FORWARD as above; untied output
# head 16 x 6 and halting head 16 x 2 kernels (counted per token): 6 x (96 + 32) = 768.
# last_cycle trains the last cycle's 3 applications (3 run forward only); one_step the
# last z and y updates (4 forward only). q_learning adds a forward pass (no gradient) of
# the whole step for its Q target: a third of flops_per_token.
HEADS = 768


@pytest.mark.parametrize("gradient,halting,step", [
    ("last_cycle", "bce", 3 * LAYER + 3 * FORWARD + HEADS),
    ("one_step", "bce", 2 * LAYER + 4 * FORWARD + HEADS),
    ("one_step", "q_learning", 2 * LAYER + 4 * FORWARD + HEADS + (6 * LAYER + HEADS) // 3),
])
def test_recursion_supervision_step_flops(gradient, halting, step):
  model = tiny("puzzle", 6, vocab_size=6, tie_embeddings=False, norm_position="post",
               norm="rmsnorm")
  model.recursion.update({"net_layers": 1, "latent_steps": 2, "cycles": 2,
                          "gradient": gradient, "halting": halting, "supervision_steps": 3,
                          "eval_supervision_steps": 5})
  summary = models.summarize(model, seq_len=8)
  spec = models.spec_of(model)
  assert models.layer_flops(spec, spec.stacks[0], 8) == LAYER
  assert summary["flops_per_token"] == 6 * LAYER + HEADS  # every applied layer at 6x
  r = summary["recursion"]
  assert r["applied_layers_per_step"] == 6
  assert r["no_grad_layers"] == {"last_cycle": 3, "one_step": 4}[gradient]
  assert r["layer_flops_per_token"] == LAYER
  assert r["step_flops_per_token"] == step
  assert r["supervision_steps"] == 3 and r["train_flops_per_token"] == 3 * step
  assert models.train_flops_per_token(summary) == 3 * step  # a whole train step, at most
  assert r["eval_flops_per_token"] == 5 * (6 * LAYER + HEADS) // 3
  assert models.summarize(tiny("decoder_lm"), seq_len=8)["recursion"] is None
