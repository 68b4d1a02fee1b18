"""Sharded training on 8 fake CPU devices equals one device; shardings follow the rules."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bench.sharded_run import lm_batch, mesh_config, sharded_steps
from xlps import config as config_lib
from xlps import partitioning

from helpers import tiny

MESHES = {"data8": {"data": 8}, "fsdp8": {"fsdp": 8},
          "d2f2t2": {"data": 2, "fsdp": 2, "tensor": 2}, "t2f4": {"tensor": 2, "fsdp": 4}}


def run(model_cfg, axes, steps=3):
  """(final state, loss of each step) of ``steps`` train steps on random batches."""
  t = config_lib.train_config()
  t.learning_rate, t.warmup_steps = 1e-2, 1
  s = sharded_steps(model_cfg, t, axes)
  state, losses, rng = s.state, [], np.random.default_rng(0)
  for _ in range(steps):
    state, metrics = s.train(state, s.global_batch(lm_batch(rng, 8, 8, 1, 32)))
    losses.append(float(metrics["loss_sum"] / metrics["tokens"]))
  return state, losses


@pytest.fixture(scope="module", params=["tied", "unshared"])
def model_and_reference(request):
  num_unique = 1 if request.param == "tied" else 3
  m = tiny(num_layers=3, num_kv_heads=2, sharing={"num_unique": num_unique,
                                                   "order": "sequence"})
  return m, run(m, {"data": 1})


@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_equals_single_device(model_and_reference, name):
  m, (ref_state, ref_losses) = model_and_reference
  state, losses = run(m, MESHES[name])
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
  # atol: the key bias has an exactly zero true gradient (softmax is shift invariant), so
  # Adam turns float32 reduction-order noise into updates of ~1e-6; weights are ~2e-2.
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  # The parameters really are sharded as the rules say.
  layers = state.params["decoder"]["layers"]
  lead = () if m.sharing.num_unique == 1 else (None,)
  fsdp = "fsdp" if MESHES[name].get("fsdp", 1) > 1 else None
  tensor = "tensor" if MESHES[name].get("tensor", 1) > 1 else None
  expect = {
      ("attention", "query", "kernel"): P(*lead, fsdp, tensor, None),
      ("attention", "key", "kernel"): P(*lead, fsdp, tensor, None),
      ("attention", "out", "kernel"): P(*lead, tensor, None, fsdp),
      ("mlp", "wi", "kernel"): P(*lead, fsdp, tensor),
      ("mlp", "wo", "kernel"): P(*lead, tensor, fsdp),
  }
  for path, spec in expect.items():
    leaf = layers[path[0]][path[1]][path[2]]
    assert leaf.sharding.mesh.shape == {"data": 1, "fsdp": 1, "tensor": 1, **MESHES[name]}
    got = tuple(leaf.sharding.spec) + (None,) * (leaf.ndim - len(leaf.sharding.spec))
    want = tuple(spec) + (None,) * (leaf.ndim - len(spec))
    assert [a if (a and leaf.sharding.mesh.shape[a] > 1) else None for a in got] == list(want), (
        path, leaf.sharding.spec)
  embedding = state.params["embedder"]["embedding"]
  shards = {s.data.shape for s in embedding.addressable_shards}
  expected_rows = 32 // MESHES[name].get("tensor", 1)
  expected_cols = 16 // MESHES[name].get("fsdp", 1)
  assert shards == {(expected_rows, expected_cols)}
  # Adam moments follow the parameters' shardings.
  mu = state.opt_state[1][0].mu["decoder"]["layers"]["mlp"]["wi"]["kernel"]
  assert mu.sharding == layers["mlp"]["wi"]["kernel"].sharding


def test_fsdp_shrinks_per_device_params(model_and_reference):
  m, (ref_state, _) = model_and_reference
  state, _ = run(m, {"fsdp": 8}, steps=1)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(ref_state.params))
  per_device = partitioning.per_device_bytes(state.params)
  assert per_device < total / 4  # only norms / biases without an fsdp axis stay whole


def test_mesh_errors_before_compiling():
  with pytest.raises(ValueError, match=r"needs 6 devices but 8 are available"):
    partitioning.make_mesh(mesh_config(data=3, fsdp=2))
  with pytest.raises(ValueError, match=r"do not divide the 8 devices"):
    partitioning.make_mesh(mesh_config(data=-1, tensor=3))
  with pytest.raises(ValueError, match=r"at most one axis may fill"):
    partitioning.make_mesh(mesh_config(data=-1, fsdp=-1))
  assert partitioning.make_mesh(mesh_config(data=-1, tensor=2)).shape["data"] == 4
  m = tiny(num_layers=2, num_heads=4)  # 4 heads cannot be split 8 ways
  with pytest.raises(ValueError, match=r"\['attention'\]\['\w+'\]\['\w+'\] has shape .*"
                     r"sharded over mesh axes \('tensor',\) of total size 8"):
    run(m, {"tensor": 8}, steps=1)


def test_bfloat16_compute_keeps_float32_params():
  m = tiny(num_layers=2, dtype="bfloat16")
  state, losses = run(m, {"data": 1}, steps=3)
  _, ref_losses = run(tiny(num_layers=2), {"data": 1}, steps=3)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  np.testing.assert_allclose(losses, ref_losses, rtol=2e-2)  # bf16 rounding, same trajectory
