"""Device mesh, logical axis rules and shardings (what ``pjit`` was, as ``jax.jit``).

The mesh has three axes: ``data`` (batch), ``fsdp`` (batch and parameter shards) and
``tensor`` (heads / MLP / vocab). Parameters carry logical axis names; the rules below
map them to mesh axes, so one model runs on 1 CPU, 8 fake devices or a pod unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from xlps.config import MESH_AXES, ConfigError, mesh_shape

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]


def standard_logical_axis_rules(additional: Sequence[tuple[str, Any]] = ()) -> Rules:
  """Logical axis -> mesh axes; ``additional`` rules take precedence (t5x style)."""
  return tuple(tuple(r) for r in additional) + (
      ("batch", ("data", "fsdp")),
      ("length", None),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("kv", None),
      ("vocab", "tensor"),
      ("factor", None),
      ("unique", None),   # the stacked axis of a group's unique parameter sets: replicated
      ("depth", None),    # the applied-depth axis of per-layer adapters (LoRA): replicated
  )


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
  """A Mesh with Auto axis types (``jax.make_mesh`` would default to Explicit in 0.10)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(cfg, len(devices))
  return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES)


def rules_of(cfg: ml_collections.ConfigDict) -> Rules:
  return standard_logical_axis_rules(cfg.get("rules", ()))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Mesh and logical rules for tracing (activation sharding constraints)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def logical_shardings(boxed_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree whose leaves are ``nn.LogicallyPartitioned`` boxes."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def check_divisible(abstract_tree: Any, shardings: Any, mesh: Mesh) -> None:
  """Raises ConfigError, before compiling, for a dimension its mesh axes do not divide."""
  flat_a = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
  flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))
  for (path, leaf), sharding in zip(flat_a, flat_s):
    for dim, axes in enumerate(sharding.spec):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else tuple(axes)
      size = math.prod(mesh.shape[a] for a in axes)
      if leaf.shape[dim] % size:
        raise ConfigError(
            f"{jax.tree_util.keystr(path)} has shape {tuple(leaf.shape)}; dimension {dim} "
            f"({leaf.shape[dim]}) is sharded over mesh axes {axes} of total size {size}, "
            f"which does not divide it; change the mesh (e.g. mesh.{axes[0]}) or the model "
            "size, or map that logical axis to None in mesh.rules")


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of (batch, length) inputs."""
  return nn.logical_to_mesh_sharding(PartitionSpec("batch", "length"), mesh, rules)


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's local rows into global arrays (multi-host safe)."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def per_device_bytes(tree: Any) -> int:
  """Bytes held on the first device by a tree of (sharded) arrays."""
  device = jax.devices()[0]
  total = 0
  for x in jax.tree.leaves(tree):
    for shard in x.addressable_shards:
      if shard.device == device:
        total += shard.data.size * shard.data.dtype.itemsize
  return total
