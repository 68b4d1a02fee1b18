"""Sharing plans and parameter / FLOP accounting (plain Python, no JAX).

A model applies N layers but owns only M unique parameter sets per component. A
:class:`Plan` is the static table ``slots[i]`` in ``[0, M)`` saying which parameter set
applied layer ``i`` uses. Orders (Takase & Kiyono 2021, DESIGN.md):

* ``sequence``:  ``slots[i] = i // (N / M)``  (needs M | N; ALBERT ``num_hidden_groups``)
* ``cycle``:     ``slots[i] = i % M``
* ``cycle_rev``: ``cycle`` for the first ``M * (ceil(N / M) - 1)`` layers, then reversed
* ``middle_cycle``: the first and last layers own slots 0 and M - 1; the N - 2 middle layers
  cycle through slots 1..M-2 (Mixture-of-Recursions' best layout, Bae et al. 2025)
* ``table``:     an explicit user table (e.g. Subformer's sandwich ``0 1 1 1 1 2``)

Each component of a block (``attention``, ``mlp``, ``norms``, ``cross_attention``) may
carry its own plan, so ALBERT's ablations are configs, not code. A :class:`StackPlan` says,
for one stack of blocks, each component's plan and the parameter group it reads; components
naming one group share it (:func:`parameter_groups`), so tying across stacks is data too, and
:func:`account` derives unique / applied parameters from the groups.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence

ORDERS = ("sequence", "cycle", "cycle_rev", "middle_cycle", "table")
KV_POLICIES = ("per_layer", "cross_layer", "recursive", "table")
COMPONENTS = ("attention", "mlp", "norms", "cross_attention")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static map from N applied layers to M unique parameter sets of one component."""

  num_layers: int
  num_unique: int
  order: str
  slots: tuple[int, ...]


def parse_table(table: str | Sequence[int] | None, field: str) -> tuple[int, ...] | None:
  """Parses an explicit slot table given as ``"0 1 1 2"``, ``"0,1,1,2"`` or a sequence."""
  if table is None or (isinstance(table, str) and not table.strip()):
    return None
  if isinstance(table, str):
    items = table.replace(",", " ").split()
    try:
      return tuple(int(t) for t in items)
    except ValueError:
      raise ValueError(
          f"{field}={table!r} is not a slot table; expected integers separated by spaces "
          "or commas, e.g. '0 1 1 2'") from None
  return tuple(int(t) for t in table)


def _full_table(parsed: tuple[int, ...] | None, num_layers: int, field: str, needs: str,
                what: str, example: str) -> tuple[int, ...]:
  """``parsed``, which ``needs`` (the setting that reads it) requires: one entry per layer."""
  if parsed is None:
    raise ValueError(f"{needs} needs {field}.table, a list of {num_layers} {what} indices such "
                     f"as '{example}'")
  if len(parsed) != num_layers:
    raise ValueError(f"{field}.table has {len(parsed)} entries {parsed}; it needs exactly one "
                     f"per applied layer, num_layers={num_layers}")
  return parsed


def _unread_table(field: str, table: object, order: str | None) -> ValueError:
  """The error for a table given with a non-table order (it would be silently ignored)."""
  return ValueError(f"{field}.table={table!r} is only read when {field}.order='table' "
                    f"(order is {order!r}); clear it or set order='table'")


def make_plan(num_layers: int, num_unique: int, order: str,
              table: str | Sequence[int] | None = None, field: str = "sharing") -> Plan:
  """Builds a :class:`Plan`, raising ValueError that names ``field`` on bad input."""
  if not isinstance(num_layers, int) or num_layers < 1:
    raise ValueError(f"num_layers={num_layers!r} must be an integer >= 1")
  if order not in ORDERS:
    raise ValueError(f"{field}.order={order!r} is not a sharing order; valid: {', '.join(ORDERS)}")
  parsed = parse_table(table, f"{field}.table")
  if order == "table":
    parsed = _full_table(parsed, num_layers, field, f"{field}.order='table'", "slot", "0 1 1 2")
    if isinstance(num_unique, int) and num_unique > 0:
      m = num_unique
    else:
      m = max(parsed) + 1
    bad = [x for x in parsed if not 0 <= x < m]
    if bad:
      raise ValueError(f"{field}.table entries {bad} are out of range; with "
                       f"{field}.num_unique={m} valid slots are 0..{m - 1}")
    missing = sorted(set(range(m)) - set(parsed))
    if missing:
      raise ValueError(f"{field}.table {parsed} never uses slots {missing}; slots must be "
                       f"0..M-1 with every slot used")
    return Plan(num_layers, m, order, parsed)
  if parsed is not None:
    raise _unread_table(field, table, order)
  if not isinstance(num_unique, int) or not 1 <= num_unique <= num_layers:
    raise ValueError(f"{field}.num_unique={num_unique!r} must be an integer in "
                     f"[1, num_layers={num_layers}]")
  n, m = num_layers, num_unique
  if order == "middle_cycle" and not (m == n or 3 <= m):
    raise ValueError(f"{field}.num_unique={m} with order='middle_cycle' and num_layers={n}: the "
                     "first and last layers own a slot each and the middle needs at least one; "
                     f"valid num_unique: {list(range(3, n + 1)) or [n]}")
  if order == "sequence":
    if n % m:
      divisors = [d for d in range(1, n + 1) if n % d == 0]
      raise ValueError(f"{field}.num_unique={m} does not divide num_layers={n}, which "
                       f"order='sequence' needs; valid num_unique: {divisors} "
                       "(or use order='cycle' / 'cycle_rev' / 'table')")
    slots = tuple(i // (n // m) for i in range(n))
  elif order == "cycle":
    slots = tuple(i % m for i in range(n))
  elif order == "middle_cycle":
    slots = tuple(0 if i == 0 else m - 1 if i == n - 1 else 1 + (i - 1) % (m - 2)
                  for i in range(n)) if m < n else tuple(range(n))
  else:  # cycle_rev
    head = m * (math.ceil(n / m) - 1)
    slots = tuple(i % m if i < head else m - 1 - (i % m) for i in range(n))
  return Plan(n, m, order, slots)


def component_plans(sharing: Mapping, num_layers: int, components: Iterable[str],
                    field: str = "model.sharing") -> dict[str, Plan]:
  """Per-component plans from a sharing config.

  ``sharing`` holds the default ``num_unique`` / ``order`` / ``table``; a sub-dict named
  after a component overrides any of those keys for that component (``None`` or missing
  means inherit). Unknown sub-dicts raise ValueError, and so does a ``table`` whose order
  is not 'table' (a component that overrides only ``order`` does not inherit the table).
  """
  known = {"num_unique", "order", "table"}
  for key in sharing:
    if key not in known and key not in COMPONENTS:
      raise ValueError(f"{field}.{key} is not a sharing key; valid keys: "
                       f"{', '.join(sorted(known))} and components {', '.join(COMPONENTS)}")
  if sharing.get("order") != "table" and parse_table(sharing.get("table"), f"{field}.table"):
    raise _unread_table(field, sharing.get("table"), sharing.get("order"))
  plans = {}
  for comp in components:
    if comp not in COMPONENTS:
      raise ValueError(f"component {comp!r} is unknown; valid: {', '.join(COMPONENTS)}")
    raw = sharing.get(comp) or {}
    for key in raw:
      if key not in known:
        raise ValueError(f"{field}.{comp}.{key} is not a sharing key; valid: "
                         f"{', '.join(sorted(known))}")
    override = {k: v for k, v in raw.items() if v is not None and v != ""}
    def pick(key, override=override):
      value = override.get(key)
      return sharing.get(key) if value is None else value
    order = pick("order")
    table = pick("table") if order == "table" or override.get("table") else None
    # A per-component table implies order='table' unless an order is given explicitly.
    if override.get("table") and override.get("order") is None:
      order = "table"
    num_unique = pick("num_unique")
    if order == "table" and override.get("num_unique") is None and sharing.get("order") != "table":
      num_unique = 0  # a component's own table defines its M
    sub = f"{field}.{comp}" if override else field
    plans[comp] = make_plan(num_layers, num_unique, order, table, field=sub)
  return plans


def looped_slots(prelude: int, core: int, iterations: int, coda: int) -> tuple[int, ...]:
  """Slots of a looped stack: prelude layers 0..P-1 once, the core's C slots cycled over
  ``iterations``, coda slots once after them (Huginn's prelude / recurrent core / coda)."""
  return (tuple(range(prelude)) + tuple(prelude + j for _ in range(iterations)
                                        for j in range(core))
          + tuple(prelude + core + j for j in range(coda)))


# ----------------------------------------------------------------------- K/V sharing


@dataclasses.dataclass(frozen=True)
class KVPlan:
  """Static map from N applied layers to the C K/V entries their self-attention reads.

  ``entries[i]`` is the entry layer ``i`` attends with and ``produces[i]`` whether it writes
  it (the entry's first reader). A decode cache holds C entries per token. Training needs
  no cache, only a buffer carried along depth for entries read again later; entries whose
  reader spans do not overlap share one of its ``num_registers`` rows (``registers[i]``),
  so cross_layer trains with one row whatever N. ``shared`` is False when every layer reads
  only its own K/V (then nothing is carried).
  """

  policy: str
  entries: tuple[int, ...]
  produces: tuple[bool, ...]
  registers: tuple[int, ...]

  @property
  def num_entries(self) -> int:
    return max(self.entries) + 1

  @property
  def num_registers(self) -> int:
    return max(self.registers) + 1

  @property
  def shared(self) -> bool:
    return not all(self.produces)


def _registers(entries: Sequence[int]) -> tuple[int, ...]:
  """Row of each layer's entry in the training buffer: an entry holds a row from its first
  to its last reader, and rows are reused once free (interval allocation, in layer order)."""
  last = {e: i for i, e in enumerate(entries)}
  row_of: dict[int, int] = {}
  free: list[int] = []
  size = 0
  rows = []
  for i, e in enumerate(entries):
    if e not in row_of:
      if free:
        row_of[e] = free.pop(0)
      else:
        row_of[e], size = size, size + 1
    rows.append(row_of[e])
    if last[e] == i:
      free.append(row_of[e])
      free.sort()
  return tuple(rows)


def make_kv_plan(policy: str, attention: Plan, group_size: int = 0,
                 table: str | Sequence[int] | None = None,
                 field: str = "model.kv_sharing") -> KVPlan:
  """Builds a :class:`KVPlan` for a stack whose self-attention follows ``attention``;
  ValueError naming ``field`` on bad input."""
  n = attention.num_layers
  if policy not in KV_POLICIES:
    raise ValueError(f"{field}.policy={policy!r} is not a K/V sharing policy; valid: "
                     f"{', '.join(KV_POLICIES)}")
  if group_size and policy != "cross_layer":
    raise ValueError(f"{field}.group_size={group_size!r} is only read when "
                     f"{field}.policy='cross_layer' (policy is {policy!r}); set it to 0")
  parsed = parse_table(table, f"{field}.table")
  if parsed is not None and policy != "table":
    raise ValueError(f"{field}.table={table!r} is only read when {field}.policy='table' "
                     f"(policy is {policy!r}); clear it or set policy='table'")
  if policy == "per_layer":
    entries = tuple(range(n))
  elif policy == "cross_layer":
    if not isinstance(group_size, int) or isinstance(group_size, bool) or not 1 <= group_size:
      raise ValueError(f"{field}.group_size={group_size!r} must be an integer >= 1 with "
                       "policy='cross_layer' (layers per K/V group; 2 = CLA2)")
    entries = tuple(i // group_size for i in range(n))
  elif policy == "recursive":
    entries = attention.slots
  else:
    parsed = _full_table(parsed, n, field, f"{field}.policy='table'", "entry", "0 1 2 2")
    first_seen = list(dict.fromkeys(parsed))
    if first_seen != list(range(len(first_seen))):
      raise ValueError(f"{field}.table={parsed} must number entries 0, 1, 2, ... in the order "
                       "of their first use (the first layer reading an entry produces it)")
    entries = parsed
  produces = tuple(e not in entries[:i] for i, e in enumerate(entries))
  return KVPlan(policy, tuple(entries), produces, _registers(entries))


# ----------------------------------------------------------------------- stacks and groups

BLOCK_SCOPE = "layers"  # name of a stack's (scanned) block module in the parameter tree


@dataclasses.dataclass(frozen=True)
class StackPlan:
  """One stack's applied depth: each component's plan and the parameter group it reads.

  A group is stored at ``(owner, BLOCK_SCOPE, group)`` in the parameter tree, stacked over
  the plan's ``num_unique`` slots. Components (of one stack or of two) that name the same
  ``(owner, group)`` share those parameters: tying across stacks is data, like sharing
  across depth.
  """

  name: str                                  # e.g. "encoder", "decoder"
  owner: str                                 # the stack module holding every group used here
  uses: tuple[tuple[str, str, Plan], ...]    # (component, group, plan)
  kv: KVPlan | None = None                   # self-attention K/V sharing (None: per layer)

  @property
  def plans(self) -> dict[str, Plan]:
    return {comp: plan for comp, _, plan in self.uses}

  @property
  def num_layers(self) -> int:
    return self.uses[0][2].num_layers


def stack_plan(name: str, num_layers: int, components: Sequence[str], groups: Mapping[str, str],
               sharing: Mapping, field: str = "model.sharing",
               kv_sharing: Mapping | None = None) -> StackPlan:
  """The plan of stack ``name``: ``components`` planned by ``sharing`` (see
  :func:`component_plans`), each reading the group ``groups.get(comp, f"{name}/{comp}")``
  given as ``"owner/group"``, and its self-attention's K/V plan from ``kv_sharing``
  (``policy`` / ``group_size`` / ``table``, see :func:`make_kv_plan`; None = per layer).
  Every group of a stack must have one owner."""
  plans = component_plans(sharing, num_layers, components, field)
  paths = {comp: groups.get(comp, f"{name}/{comp}").split("/") for comp in components}
  owners = {path[0] for path in paths.values()}
  if len(owners) != 1 or any(len(path) != 2 for path in paths.values()):
    raise ValueError(f"stack {name!r}: groups {paths} must all be 'owner/group' with one owner")
  kv = kv_sharing or {"policy": "per_layer"}
  kv_field = field.rsplit(".", 1)[0] + ".kv_sharing" if "." in field else "kv_sharing"
  kv_plan = make_kv_plan(kv["policy"], plans["attention"], kv.get("group_size", 0),
                         kv.get("table"), kv_field)
  return StackPlan(name, owners.pop(),
                   tuple((comp, paths[comp][1], plans[comp]) for comp in components), kv_plan)


@dataclasses.dataclass(frozen=True)
class Group:
  """A stacked parameter subtree and every ``(stack, component, plan)`` that applies it."""

  path: tuple[str, ...]                      # (owner, BLOCK_SCOPE, group)
  uses: tuple[tuple[str, str, Plan], ...]    # (stack, component, plan)

  @property
  def num_unique(self) -> int:
    return self.uses[0][2].num_unique


def parameter_groups(stacks: Sequence[StackPlan]) -> dict[tuple[str, ...], Group]:
  """Path -> :class:`Group` for every parameter group the stacks use (tied groups once).

  Raises ValueError when components sharing a group disagree on its ``num_unique``."""
  uses: dict[tuple[str, ...], list] = {}
  for stack in stacks:
    for comp, group, plan in stack.uses:
      uses.setdefault((stack.owner, BLOCK_SCOPE, group), []).append((stack.name, comp, plan))
  for path, group_uses in uses.items():
    sizes = {f"{stack}.{comp}": plan.num_unique for stack, comp, plan in group_uses}
    if len(set(sizes.values())) > 1:
      raise ValueError(f"components {sizes} share the parameter group {'/'.join(path)} but "
                       "plan different num_unique; tied components need the same num_unique")
  return {path: Group(path, tuple(group_uses)) for path, group_uses in uses.items()}


# ----------------------------------------------------------------------------- accounting


# Leaves of a group stacked along its applied depth (one entry per applied layer, LoRA
# adapters: xlps.models.layers.Dense), not over its M slots; the matmul ones are LORA_MATMUL.
PER_LAYER_LEAVES = ("lora_a", "lora_b", "lora_bias")
LORA_MATMUL = ("lora_a", "lora_b")


def _numel(shape: Sequence[int]) -> int:
  return math.prod(int(d) for d in shape)


def account(param_shapes: Mapping[tuple[str, ...], Sequence[int]],
            groups: Iterable[Group],
            attention_flops_per_token: int = 0,
            output_matmul_params: int = 0) -> dict:
  """Unique / applied parameters and training FLOPs per token.

  ``param_shapes`` maps each parameter path to its shape. Parameters under a
  ``Group.path`` are stacked over the group's M slots (no axis when M == 1) and count
  ``(applied layers of all its uses) / M`` times when applied, except ``PER_LAYER_LEAVES``
  (stacked along applied depth: each entry applied once); all others count once.
  Training FLOPs are ``6 x`` applied matmul parameters (leaves named ``kernel`` and the
  LoRA factors, plus ``output_matmul_params`` for an output projection tied to the
  embedding) plus the given attention-score FLOPs (which the caller derives from sequence
  lengths).
  """
  groups = list(groups)
  multi_stack = len({stack for g in groups for stack, _, _ in g.uses}) > 1
  rows = []
  claimed: set[tuple[str, ...]] = set()
  applied_matmul = output_matmul_params
  for group in groups:
    leaves = {p: s for p, s in param_shapes.items() if p[:len(group.path)] == group.path}
    if not leaves:
      continue
    m = group.num_unique
    stack, comp, _ = group.uses[0]
    per_layer = {p: _numel(s) for p, s in leaves.items() if p[-1] in PER_LAYER_LEAVES}
    shared = sum(_numel(s) for p, s in leaves.items() if p not in per_layer)
    kernels = sum(_numel(s) for p, s in leaves.items() if p[-1] == "kernel")
    applications = sum(plan.num_layers for _, _, plan in group.uses)
    rows.append({
        # A group used by several stacks (tied) is named by its component alone.
        "component": f"{stack}/{comp}" if multi_stack and len(group.uses) == 1 else comp,
        "path": "/".join(group.path),
        "slots": m,
        "applications": applications,
        "unique_params": shared + sum(per_layer.values()),
        "applied_params": shared // m * applications + sum(per_layer.values()),
        "adapter_params": sum(per_layer.values()),
    })
    applied_matmul += kernels // m * applications + sum(
        n for p, n in per_layer.items() if p[-1] in LORA_MATMUL)
    claimed.update(leaves)
  rest = {p: s for p, s in param_shapes.items() if p not in claimed}
  other = sum(_numel(s) for s in rest.values())
  applied_matmul += sum(_numel(s) for p, s in rest.items() if p[-1] == "kernel")
  rows.append({"component": "other", "path": "(embeddings, heads, final norms)", "slots": 1,
               "applications": 1, "unique_params": other, "applied_params": other,
               "adapter_params": 0})
  return {
      "unique_params": sum(r["unique_params"] for r in rows),
      "applied_params": sum(r["applied_params"] for r in rows),
      "applied_matmul_params": applied_matmul,
      "flops_per_token": 6 * applied_matmul + attention_flops_per_token,
      "components": rows,
  }
