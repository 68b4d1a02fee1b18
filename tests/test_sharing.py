"""Sharing plans: the orders' formulas, per-component plans, and clear errors."""

import pytest

from xlps import config as config_lib
from xlps import models
from xlps import sharing

from helpers import configure


@pytest.mark.parametrize("n,m,order,expected", [
    (6, 3, "sequence", [0, 0, 1, 1, 2, 2]),
    (6, 3, "cycle", [0, 1, 2, 0, 1, 2]),
    (12, 6, "cycle_rev", [0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0]),
    (18, 6, "cycle_rev", [0, 1, 2, 3, 4, 5] * 2 + [5, 4, 3, 2, 1, 0]),
    (7, 3, "cycle_rev", [0, 1, 2, 0, 1, 2, 2]),
    (5, 2, "cycle", [0, 1, 0, 1, 0]),
    (4, 1, "cycle_rev", [0, 0, 0, 0]),
    (4, 4, "sequence", [0, 1, 2, 3]),
    (6, 3, "middle_cycle", [0, 1, 1, 1, 1, 2]),
    (6, 4, "middle_cycle", [0, 1, 2, 1, 2, 3]),
    (9, 5, "middle_cycle", [0, 1, 2, 3, 1, 2, 3, 1, 4]),
    (4, 4, "middle_cycle", [0, 1, 2, 3]),
    (2, 2, "middle_cycle", [0, 1]),
])
def test_orders(n, m, order, expected):
  plan = sharing.make_plan(n, m, order)
  assert list(plan.slots) == expected
  assert plan.num_unique == m


@pytest.mark.parametrize("n,g", [(12, 1), (12, 2), (12, 3), (24, 4), (12, 12)])
def test_sequence_is_albert_hidden_groups(n, g):
  # ALBERT / HF: group of applied layer i = int(i / (N / G)).
  plan = sharing.make_plan(n, g, "sequence")
  assert list(plan.slots) == [int(i / (n / g)) for i in range(n)]


def test_cycle_rev_general_formula():
  # Takase & Kiyono (1-indexed): layer i uses theta_{((i-1) mod M)+1} for
  # i <= M*(ceil(N/M)-1), else theta_{M - ((i-1) mod M)}.
  import math
  for n in range(1, 20):
    for m in range(1, n + 1):
      head = m * (math.ceil(n / m) - 1)
      ref = [((i - 1) % m) if i <= head else m - 1 - ((i - 1) % m) for i in range(1, n + 1)]
      assert list(sharing.make_plan(n, m, "cycle_rev").slots) == ref


def test_table_and_inference():
  plan = sharing.make_plan(6, 0, "table", "0 1 1 1 1 2")
  assert plan.num_unique == 3 and plan.slots == (0, 1, 1, 1, 1, 2)
  assert sharing.make_plan(3, 2, "table", [1, 0, 1]).slots == (1, 0, 1)


def test_component_overrides_inherit():
  cfg = config_lib.sharing_config(num_unique=2, order="cycle")
  cfg.mlp.num_unique = 4
  cfg.norms.table = "0 1 2 3"
  plans = sharing.component_plans(cfg, 4, ("attention", "mlp", "norms"))
  assert plans["attention"].slots == (0, 1, 0, 1)
  assert plans["mlp"].slots == (0, 1, 2, 3)
  assert plans["norms"].order == "table" and plans["norms"].num_unique == 4

  # Overriding only the order keeps the component off the default table.
  cfg = config_lib.sharing_config(num_unique=0, order="table")
  cfg.table = "0 1 1 2"
  cfg.norms.order, cfg.norms.num_unique = "sequence", 4
  plans = sharing.component_plans(cfg, 4, ("attention", "norms"))
  assert plans["attention"].slots == (0, 1, 1, 2)
  assert plans["norms"].slots == (0, 1, 2, 3)


# Each bad config: the ValueError names the field, the value, and what would be valid.
@pytest.mark.parametrize("kw,needles", [
    ({"d_model": 256, "num_heads": 3}, ["model.num_heads=3", "d_model=256", "valid num_heads",
                                        "[1, 2, 4, 8, 16, 32, 64, 128]"]),
    ({"num_heads": 4, "num_kv_heads": 3}, ["model.num_kv_heads=3", "num_heads=4",
                                           "[1, 2, 4]"]),
    ({"num_layers": 6, "sharing": {"num_unique": 4, "order": "sequence"}},
     ["model.sharing.num_unique=4", "num_layers=6", "'sequence'", "[1, 2, 3, 6]"]),
    ({"sharing": {"order": "zigzag"}}, ["model.sharing.order='zigzag'", "sequence, cycle, "
                                        "cycle_rev, middle_cycle, table"]),
    ({"num_layers": 6, "sharing": {"num_unique": 2, "order": "middle_cycle"}},
     ["model.sharing.num_unique=2", "order='middle_cycle'", "[3, 4, 5, 6]"]),
    ({"num_layers": 4, "sharing": {"order": "table", "table": "0 1 5 1", "num_unique": 3}},
     ["model.sharing.table", "[5]", "out of range", "0..2"]),
    ({"num_layers": 4, "sharing": {"order": "table", "table": "0 1 -1 1", "num_unique": 0}},
     ["model.sharing.table", "[-1]", "out of range"]),
    ({"num_layers": 4, "sharing": {"order": "table", "table": "0 1 2"}},
     ["model.sharing.table", "3 entries", "num_layers=4"]),
    ({"num_layers": 4, "sharing": {"order": "cycle", "num_unique": 2, "table": "0 1 1 0"}},
     ["model.sharing.table='0 1 1 0'", "order='table'", "(order is 'cycle')", "clear it"]),
    ({"num_layers": 4, "sharing": {"mlp": {"order": "cycle", "table": "0 1 1 0"}}},
     ["model.sharing.mlp.table='0 1 1 0'", "model.sharing.mlp.order='table'",
      "(order is 'cycle')", "clear it"]),
    ({"num_layers": 4, "sharing": {"mlp": {"num_unique": 3, "order": "sequence"}}},
     ["model.sharing.mlp.num_unique=3", "num_layers=4", "[1, 2, 4]"]),
    ({"num_layers": 4, "sharing": {"num_unique": 5}}, ["model.sharing.num_unique=5", "[1, num_layers=4]"]),
    ({"family": "gpt"}, ["model.family='gpt'", "decoder_lm, encoder_mlm, encoder_decoder"]),
    ({"activation": "tanh"}, ["model.activation='tanh'", "relu, gelu, gelu_tanh, swiglu"]),
    ({"remat_policy": "sometimes"}, ["model.remat_policy='sometimes'", "dots_saveable"]),
    ({"num_layers": 6, "remat_group_size": 4},
     ["model.remat_group_size=4", "decoder stack's depth 6", "[1, 2, 3, 6]"]),
    ({"remat_group_size": 2, "scan_layers": False},
     ["model.remat_group_size=2", "scan_layers=True"]),
    ({"remat_group_size": -2}, ["model.remat_group_size=-2", ">= -1"]),
    ({"embed_dim": 512, "d_model": 256}, ["model.embed_dim=512", "d_model=256"]),
    ({"tie_encoder_decoder": True}, ["model.tie_encoder_decoder=True", "encoder_decoder"]),
])
def test_bad_config_errors(kw, needles):
  with pytest.raises(ValueError) as err:
    models.spec_of(configure(config_lib.model_config(), **kw))
  for needle in needles:
    assert needle in str(err.value), (needle, str(err.value))


def test_unknown_component_and_key():
  m = config_lib.model_config()
  with m.unlocked():
    m.sharing.embeddings = {"num_unique": 2}
  with pytest.raises(ValueError, match=r"model\.sharing\.embeddings is not a sharing key.*"
                     r"attention, mlp, norms, cross_attention"):
    models.spec_of(m)
  with pytest.raises(ValueError, match=r"component 'ffn' is unknown; valid: attention, mlp"):
    sharing.component_plans(config_lib.sharing_config(), 4, ("ffn",))
  m = config_lib.model_config()
  with m.unlocked():
    m.sharing.mlp.width = 3
  with pytest.raises(ValueError, match=r"model\.sharing\.mlp\.width is not a sharing key"):
    models.spec_of(m)
  m = config_lib.model_config()
  with m.unlocked():
    m.num_layer = 3
  with pytest.raises(ValueError, match=r"model\.num_layer is not a model key.*num_layers"):
    models.spec_of(m)


def test_tied_encoder_decoder_depths():
  # The decoder applies the encoder's M slots over its own depth with the same order.
  m = configure(config_lib.model_config(), family="encoder_decoder", tie_encoder_decoder=True,
                num_layers=4, num_decoder_layers=6, sharing={"num_unique": 2, "order": "cycle"})
  spec = models.spec_of(m)
  assert spec.stack_plans("encoder")["attention"].slots == (0, 1) * 2
  assert spec.stack_plans("decoder")["attention"].slots == (0, 1) * 3
  m.sharing.num_unique, m.sharing.order = 4, "sequence"  # 4 divides 4 but not 6
  with pytest.raises(ValueError, match=r"num_unique=4 does not divide num_layers=6"):
    models.spec_of(m)
