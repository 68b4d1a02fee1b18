"""The mesh section: its axes and logical-axis rules, ``check_mesh``, and ``mesh_shape``
(the -1 axis resolved against the devices there are)."""

from __future__ import annotations

import math

import ml_collections

from xlps.config.checks import ConfigError, check_keys, then_valid


MESH_AXES = ("data", "fsdp", "tensor")
# The logical axis names that parameters and activations carry (xlps.partitioning maps
# each to mesh axes; mesh.rules may remap them).
LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv_heads", "kv", "vocab", "factor",
                "unique", "depth")


def mesh_config() -> ml_collections.ConfigDict:
  """Mesh shape; -1 fills the axis with the devices the others leave."""
  m = ml_collections.ConfigDict()
  m.data = -1       # data-parallel replicas
  m.fsdp = 1        # parameters and optimizer state sharded over this axis too
  m.tensor = 1      # tensor parallelism over heads / mlp / vocab
  m.rules = ()      # extra (logical, mesh axis) rules placed before the standard ones
  return m


def check_mesh(cfg: ml_collections.ConfigDict) -> None:
  """The mesh section's keys and ``rules``: (logical axis, mesh axis | tuple of them | None)."""
  check_keys(cfg, "mesh", tuple(mesh_config()), "mesh")
  rules = cfg.get("rules", ())
  example = "(('mlp', 'fsdp'), ('vocab', None))"
  if isinstance(rules, (str, bytes)) or not isinstance(rules, (tuple, list)):
    raise ConfigError(f"mesh.rules={rules!r} must be a sequence of (logical axis, mesh axes) "
                      f"pairs; valid: e.g. {example}")
  for rule in rules:
    if isinstance(rule, (str, bytes)) or not isinstance(rule, (tuple, list)) or len(rule) != 2:
      raise ConfigError(f"mesh.rules entry {rule!r} is not a (logical axis, mesh axes) pair; "
                        f"valid: pairs such as {example}")
    logical, axes = rule
    if logical not in LOGICAL_AXES:
      raise ConfigError(f"mesh.rules entry {tuple(rule)!r} names the logical axis {logical!r}, "
                        f"which no parameter or activation has{then_valid(logical, LOGICAL_AXES)}"
                        f"valid logical axes: {', '.join(LOGICAL_AXES)}")
    names = axes if isinstance(axes, (tuple, list)) else (axes,)
    for name in names:
      if name is not None and name not in MESH_AXES or (name is None and len(names) > 1):
        raise ConfigError(f"mesh.rules entry {tuple(rule)!r} names the mesh axis {name!r}, which "
                          f"the mesh does not have{then_valid(name, MESH_AXES)}valid mesh axes: "
                          f"{', '.join(MESH_AXES)}, a tuple of them, or None (replicated)")


def mesh_shape(cfg: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves -1 entries; raises ConfigError naming the fields when it cannot fit."""
  sizes = [cfg[a] for a in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if isinstance(size, bool) or not isinstance(size, int) or (size < 1 and size != -1):
      raise ConfigError(f"mesh.{axis}={size!r} must be a positive integer or -1 (fill)")
  fill = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  if len(fill) > 1:
    raise ConfigError(f"mesh axes {fill} are all -1; at most one axis may fill the devices")
  fixed = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % fixed:
      raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes ({fixed} devices) "
                        f"do not divide the {num_devices} devices available")
    sizes = [num_devices // fixed if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs "
                      f"{math.prod(sizes)} devices but {num_devices} are available; make the "
                      "product equal the device count or set one axis to -1")
  return tuple(sizes)
