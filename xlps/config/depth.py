"""The model section's depth sub-sections: how N applied layers use M unique sets.

``model.sharing`` (the plan of each component), ``model.kv_sharing`` (which layers share
self-attention K/V), ``model.loop`` (prelude / iterated core / coda), ``model.act`` (adaptive
halting), ``model.lora`` (per-applied-layer adapters on shared slots) and ``model.routing``
(per-position recursion depth): each one's schema with its defaults and, for the last four,
the frozen spec that ``ModelSpec`` holds once it is validated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import ml_collections
from ml_collections import config_dict

from xlps import families as families_lib
from xlps import sharing as sharing_lib
from xlps.config.checks import (ConfigError, check_bool, check_choice, check_int, check_number,
                                check_str)


def sharing_config(num_unique: int = 1, order: str = "cycle") -> ml_collections.ConfigDict:
  """Default plan plus per-component overrides (None = inherit the default)."""
  s = ml_collections.ConfigDict()
  s.num_unique = num_unique    # M: unique parameter sets per component (1 = fully tied)
  s.order = order              # sequence | cycle | cycle_rev | middle_cycle | table
  s.table = ""                 # explicit slots for order='table', e.g. "0 1 1 1 2"
  for comp in sharing_lib.COMPONENTS:
    s[comp] = ml_collections.ConfigDict({
        "num_unique": config_dict.placeholder(int),   # override M for this component
        "order": config_dict.placeholder(str),        # override the order
        "table": config_dict.placeholder(str),        # own explicit table (implies 'table')
    })
  return s


def kv_sharing_config(policy: str = "per_layer", group_size: int = 0,
                      table: str = "") -> ml_collections.ConfigDict:
  """Which applied layers share self-attention K/V (xlps.sharing.KVPlan): part of the model,
  trained and decoded alike."""
  k = ml_collections.ConfigDict()
  k.policy = policy            # per_layer | cross_layer (CLA) | recursive (MoR) | table
  k.group_size = group_size    # cross_layer: layers per K/V group (2 = CLA2); else 0
  k.table = table              # policy='table': entry read by each applied layer, "0 1 2 2"
  return k


LOOP_INJECTIONS = ("none", "add", "adapter")
LOOP_INIT_STATES = ("prelude", "zeros", "random")
LOOP_DEPTHS = ("fixed", "uniform", "poisson_lognormal")


def loop_config() -> ml_collections.ConfigDict:
  """A looped / recurrent-depth shape (Huginn, Geiping et al. 2025): an unshared prelude, a
  core of layers iterated up to (num_layers - prelude - coda) / core times, an unshared coda,
  all one sharing table in one scan (xlps.sharing.looped_slots)."""
  l = ml_collections.ConfigDict()
  l.prelude = 0                # unshared layers before the core
  l.core = 0                   # layers per core iteration; 0 = no looped shape
  l.coda = 0                   # unshared layers after the core
  l.inject = "none"            # re-inject the prelude output e each iteration: none | add |
                               # adapter (Dense(concat[state, e]), Huginn's adapter)
  l.init_state = "prelude"     # core's initial state: prelude (e) | zeros | random (N(0, init_std))
  l.train_iterations = "fixed"  # iterations per train step: fixed | uniform (1..2 mean - 1) |
                               # poisson_lognormal (Huginn: Poisson(exp(N(log mean - 1/8, 1/2))) + 1)
  l.mean_iterations = 0        # mean (fixed: the count) of train iterations; 0 = the maximum
  l.backprop_iterations = 0    # k: gradients through the last k iterations only; 0 = all
  l.eval_iterations = 0        # iterations at evaluation and generation; 0 = mean_iterations
  l.exit_threshold = 0.0       # inference early exit: a position stops iterating once its
                               # state moves less than this (relative L2) in an iteration; 0 = off
  return l


@dataclasses.dataclass(frozen=True)
class LoopSpec:
  """Validated ``model.loop`` (present only when ``core > 0``)."""

  prelude: int
  core: int
  coda: int
  max_iterations: int
  inject: str
  init_state: str
  train_iterations: str
  mean_iterations: int
  backprop_iterations: int
  eval_iterations: int
  exit_threshold: float

  def sharing(self) -> dict:
    """The sharing config of the looped table (prelude and coda slots used once)."""
    slots = sharing_lib.looped_slots(self.prelude, self.core, self.max_iterations, self.coda)
    return {"num_unique": 0, "order": "table", "table": " ".join(map(str, slots))}

  @classmethod
  def from_config(cls, m: Mapping, field: str) -> "LoopSpec | None":
    lp = m["loop"]
    for key in ("prelude", "core", "coda", "mean_iterations", "backprop_iterations",
                "eval_iterations"):
      check_int(f"{field}.{key}", lp[key], 0)
    for key, valid in (("inject", LOOP_INJECTIONS), ("init_state", LOOP_INIT_STATES),
                       ("train_iterations", LOOP_DEPTHS)):
      check_choice(f"{field}.{key}", lp[key], valid)
    check_number(f"{field}.exit_threshold", lp["exit_threshold"], 0)
    if lp["core"] == 0:
      default = loop_config()
      changed = [k for k in lp if lp[k] != default[k]]
      if changed:
        raise ConfigError(f"{field}.{changed[0]}={lp[changed[0]]!r} is only read by a looped "
                          f"stack, and {field}.core=0 (no loop): set {field}.core > 0, or leave "
                          f"{', '.join(f'{field}.{k}' for k in changed)} at the default")
      return None
    family = m["family"]
    if len(families_lib.FAMILIES[family].stacks(m)) != 1:
      raise ConfigError(f"{field}.core={lp['core']} needs a one-stack family (decoder_lm, "
                        f"encoder_mlm); model.family is {family!r}")
    body = m["num_layers"] - lp["prelude"] - lp["coda"]
    if body < lp["core"] or body % lp["core"]:
      valid = [lp["prelude"] + lp["coda"] + lp["core"] * r for r in range(1, 5)]
      raise ConfigError(f"model.num_layers={m['num_layers']} is not prelude {lp['prelude']} + "
                        f"core {lp['core']} x iterations + coda {lp['coda']}; valid: "
                        f"{', '.join(map(str, valid))}, ... (num_layers sets the most iterations)")
    default = sharing_config()
    if any(m["sharing"][k] != default[k] for k in ("num_unique", "order", "table")) or any(
        v not in (None, "") for comp in sharing_lib.COMPONENTS
        for v in dict(m["sharing"][comp]).values()):
      raise ConfigError(f"{field}.core={lp['core']} defines the sharing table (prelude and coda "
                        "slots used once, core slots cycled); leave model.sharing at its "
                        "defaults")
    if lp["inject"] == "none" and lp["init_state"] != "prelude":
      raise ConfigError(f"{field}.init_state={lp['init_state']!r} with {field}.inject='none': "
                        "the core would start from a state that holds no token and never see "
                        "the input (every output the same whatever the tokens); valid: inject "
                        "'add' or 'adapter', or init_state='prelude'")
    check_loop_kv(m["kv_sharing"], lp, field)
    most = body // lp["core"]
    for key in ("mean_iterations", "eval_iterations", "backprop_iterations"):
      if lp[key] > most:
        raise ConfigError(f"{field}.{key}={lp[key]} exceeds the {most} iterations "
                          f"model.num_layers={m['num_layers']} holds; valid: 0..{most}")
    mean = lp["mean_iterations"] or most
    return cls(lp["prelude"], lp["core"], lp["coda"], most, lp["inject"], lp["init_state"],
               lp["train_iterations"], mean, lp["backprop_iterations"],
               lp["eval_iterations"] or mean, float(lp["exit_threshold"]))


def check_loop_kv(kv: Mapping, lp: Mapping, field: str) -> None:
  """K/V sharing a looped stack can run at every depth: an active layer must never read an
  entry that a layer past the sampled depth writes. Per-layer and recursive K/V qualify;
  cross_layer when its groups stay inside the prelude and inside one core iteration (then
  a loop run for r iterations is the r-iteration model with the same policy); a fixed
  table does not (it names entries for one depth)."""
  policy, size = kv["policy"], kv["group_size"]
  prelude, core = lp["prelude"], lp["core"]
  if policy == "table":
    raise ConfigError(f"model.kv_sharing.policy='table' with {field}.core={core}: a table names "
                      "K/V entries for one fixed depth, but a looped stack runs a varying "
                      "number of core iterations; valid with a loop: per_layer, recursive, or "
                      "cross_layer with a group_size dividing prelude and core")
  if policy == "cross_layer" and isinstance(size, int) and size >= 1 and (
      prelude % size or core % size):
    valid = [g for g in range(1, core + 1) if core % g == 0 and prelude % g == 0]
    raise ConfigError(f"model.kv_sharing.group_size={size} with {field}.prelude={prelude} and "
                      f"{field}.core={core}: a K/V group would span a core iteration's edge, so "
                      "layers past the sampled depth would write entries that active layers "
                      f"read; valid group_size: {', '.join(map(str, valid))} (dividing both)")


ACT_UPDATES = ("accumulate", "interpolate")


def act_config(enabled: bool = False) -> ml_collections.ConfigDict:
  """Adaptive Computation Time over each stack's applied depth (Graves 2016; the Universal
  Transformer's per-position halting, Dehghani et al. 2018): xlps.models.controllers.act."""
  a = ml_collections.ConfigDict()
  a.enabled = enabled          # halt each position adaptively; the stack's N is the max steps
  a.threshold = 0.99           # halt once the summed halting probability exceeds 1 - eps
  a.ponder_weight = 0.01       # tau: loss += tau * mean over positions of (N(t) + R(t))
  a.halting_bias_init = 1.0    # initial bias of the halting unit (t2t's act_halting_bias_init)
  a.coordinates = True         # add the position + step sinusoid before every step (UT)
  a.update_rule = "accumulate"  # accumulate: output += x w (Graves: sum_t w_t x_t; what the
                               # UT paper's t2t code computes once its final LayerNorm removes
                               # the -1 of its `previous * 1 - w`) | interpolate: output =
                               # x w + output (1 - w) (Scenic)
  return a


@dataclasses.dataclass(frozen=True)
class ActSpec:
  """Validated ``model.act`` (present only when enabled)."""

  threshold: float
  ponder_weight: float
  halting_bias_init: float
  coordinates: bool
  update_rule: str

  @classmethod
  def from_config(cls, a: Mapping, field: str) -> "ActSpec | None":
    check_bool(f"{field}.enabled", a["enabled"])
    check_bool(f"{field}.coordinates", a["coordinates"])
    check_number(f"{field}.threshold", a["threshold"], 0, 1, open_lo=True)
    check_number(f"{field}.ponder_weight", a["ponder_weight"], 0)
    check_number(f"{field}.halting_bias_init", a["halting_bias_init"], -1e9, 1e9)
    check_choice(f"{field}.update_rule", a["update_rule"], ACT_UPDATES)
    if not a["enabled"]:
      return None
    return cls(float(a["threshold"]), float(a["ponder_weight"]), float(a["halting_bias_init"]),
               bool(a["coordinates"]), a["update_rule"])


# Dense layers of a block that LoRA may target (xlps.models.layers.Attention / MLP names).
LORA_TARGETS = ("query", "key", "value", "out", "wi", "wi_up", "wo")


def lora_config() -> ml_collections.ConfigDict:
  """Per-applied-layer low-rank adapters on shared slots (Relaxed Recursive Transformers,
  Bae et al. 2025): applied layer i adds ``x A_i B_i`` to each targeted projection of its
  slot, with A, B stacked along applied depth N."""
  l = ml_collections.ConfigDict()
  l.rank = 0                   # r; 0 = no adapters (plain tying)
  l.targets = "query,key,value,out,wi,wi_up,wo"  # projections that get one (comma-separated)
  l.bias = False               # also a per-applied-layer bias offset on each target
  return l


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Validated ``model.lora`` (present only when ``rank > 0``)."""

  rank: int
  targets: tuple[str, ...]
  bias: bool

  @classmethod
  def from_config(cls, m: Mapping, field: str) -> "LoraSpec | None":
    lora = m["lora"]
    check_int(f"{field}.rank", lora["rank"], 0)
    check_bool(f"{field}.bias", lora["bias"])
    check_str(f"{field}.targets", lora["targets"])
    targets = tuple(t.strip() for t in lora["targets"].split(",") if t.strip())
    for target in targets:
      check_choice(f"{field}.targets", target, LORA_TARGETS)
    if lora["rank"] == 0:
      return None
    if not targets:
      raise ConfigError(f"{field}.rank={lora['rank']} with empty {field}.targets; valid targets: "
                        f"{', '.join(LORA_TARGETS)} (comma-separated)")
    ranks = lora_full_ranks(m)
    if set(targets) != set(LORA_TARGETS):  # the default names all: each one the block has
      missing = [t for t in targets if t not in ranks]
      if missing:
        raise ConfigError(f"{field}.targets={lora['targets']!r} names {', '.join(missing)}, which "
                          f"this model does not have (model.activation={m['activation']!r}); "
                          f"valid: {', '.join(ranks)}")
    most = min(ranks[t] for t in targets if t in ranks)
    if lora["rank"] > most:
      raise ConfigError(f"{field}.rank={lora['rank']} exceeds the full rank of the adapted "
                        f"matrices ({most}: the smallest of {field}.targets); valid: 1..{most}")
    if m["tie_encoder_decoder"]:
      raise ConfigError(f"{field}.rank={lora['rank']} with model.tie_encoder_decoder=True: the "
                        "adapters are stacked along one stack's applied depth, and tied groups "
                        "serve two stacks; valid: rank 0, or tie_encoder_decoder=False")
    return cls(lora["rank"], targets, bool(lora["bias"]))


def lora_full_ranks(m: Mapping) -> dict[str, int]:
  """The full rank min(fan_in, fan_out) of each projection a block of model config ``m`` has
  (``wi_up`` only with SwiGLU): a LoRA rank above it adds parameters and nothing else."""
  d, heads = m["d_model"], m["num_heads"]
  head_dim = d // heads
  kv = (m["num_kv_heads"] or heads) * head_dim
  ranks = {"query": min(d, heads * head_dim), "key": min(d, kv), "value": min(d, kv),
           "out": min(heads * head_dim, d), "wi": min(d, m["d_ff"])}
  if m["activation"] == "swiglu":
    ranks["wi_up"] = min(d, m["d_ff"])
  ranks["wo"] = min(m["d_ff"], d)
  return ranks


ROUTINGS = ("none", "expert_choice", "token_choice")
ROUTING_GATINGS = ("residual", "interpolate")


def routing_config() -> ml_collections.ConfigDict:
  """Token-level recursion routing over a looped core (Mixture-of-Recursions, Bae et al. 2025):
  a router picks which positions run each core iteration (xlps.models.controllers.routing)."""
  r = ml_collections.ConfigDict()
  r.kind = "none"              # none | expert_choice (top-k positions per iteration) |
                               # token_choice (a depth per position at the first iteration)
  r.capacity = ""              # expert_choice: fraction of positions kept per iteration,
                               # e.g. "1,0.67,0.33"; "" = (R - r) / R for iteration r of R
  r.aux_weight = 0.001         # expert_choice: BCE(router, top-k selection), which makes the
                               # causal inference path (router > 0.5) follow the top-k
  r.balance_weight = 0.01      # token_choice: load-balancing loss (Switch: R sum_j f_j P_j)
  r.z_weight = 0.001           # token_choice: router z-loss (ST-MoE: mean logsumexp^2)
  r.inference = "threshold"    # deterministic passes: threshold (causal: router > 0.5) |
                               # top_k (the training rule; reads the whole sequence)
  r.gating = "residual"        # residual (the MoR code): expert_choice H + g f(H) with
                               # g = alpha sigmoid(router); token_choice x + p f^d(x), x the
                               # recursion's input, p its depth's probability | interpolate:
                               # H + g (f(H) - H) (xlps before 2026-12; saved runs keep it)
  r.alpha = 0.1                # expert_choice, gating=residual: the gate's scale (MoR: 0.1)
  return r


@dataclasses.dataclass(frozen=True)
class RoutingSpec:
  """Validated ``model.routing`` (present only when ``kind != 'none'``)."""

  kind: str
  capacity: tuple[float, ...]      # expert_choice: fraction kept at each core iteration
  aux_weight: float
  balance_weight: float
  z_weight: float
  inference: str
  gating: str
  alpha: float

  @classmethod
  def from_config(cls, r: Mapping, loop: "LoopSpec | None", field: str) -> "RoutingSpec | None":
    check_choice(f"{field}.kind", r["kind"], ROUTINGS)
    check_choice(f"{field}.inference", r["inference"], ("threshold", "top_k"))
    check_choice(f"{field}.gating", r["gating"], ROUTING_GATINGS)
    for key in ("aux_weight", "balance_weight", "z_weight"):
      check_number(f"{field}.{key}", r[key], 0)
    check_number(f"{field}.alpha", r["alpha"], 0, open_lo=True)
    check_str(f"{field}.capacity", r["capacity"])
    if r["kind"] == "none":
      return None
    if r["alpha"] != routing_config().alpha and (r["kind"], r["gating"]) != ("expert_choice",
                                                                              "residual"):
      raise ConfigError(f"{field}.alpha={r['alpha']} is only read with kind='expert_choice' and "
                        f"gating='residual' (kind is {r['kind']!r}, gating {r['gating']!r}); "
                        "leave it at 0.1")
    if loop is None:
      raise ConfigError(f"{field}.kind={r['kind']!r} routes positions through a looped core; set "
                        "model.loop.core > 0 (MoR's middle-cycle: loop.prelude=1, loop.coda=1)")
    if (loop.train_iterations, loop.backprop_iterations, loop.exit_threshold) != ("fixed", 0, 0):
      raise ConfigError(f"{field}.kind={r['kind']!r} chooses each position's depth itself; leave "
                        "model.loop.train_iterations='fixed', backprop_iterations=0 and "
                        "exit_threshold=0")
    if loop.mean_iterations != loop.max_iterations or loop.eval_iterations != loop.max_iterations:
      raise ConfigError(f"{field}.kind={r['kind']!r} routes over all {loop.max_iterations} "
                        "iterations; leave model.loop.mean_iterations and eval_iterations at 0")
    most = loop.max_iterations
    capacity = tuple((most - i) / most for i in range(most))
    if r["capacity"].strip():
      if r["kind"] != "expert_choice":
        raise ConfigError(f"{field}.capacity={r['capacity']!r} is only read with "
                          f"kind='expert_choice' (kind is {r['kind']!r}); clear it")
      try:
        capacity = tuple(float(c) for c in r["capacity"].replace(",", " ").split())
      except ValueError:
        raise ConfigError(f"{field}.capacity={r['capacity']!r} is not a list of fractions, e.g. "
                          "'1,0.67,0.33'") from None
      if (len(capacity) != most or any(not 0 < c <= 1 for c in capacity)
          or any(b > a for a, b in zip(capacity, capacity[1:]))):
        raise ConfigError(f"{field}.capacity={r['capacity']!r} needs {most} fractions in (0, 1], "
                          "one per core iteration, non-increasing (only positions kept at "
                          "iteration r - 1 can be kept at r)")
    return cls(r["kind"], capacity, float(r["aux_weight"]), float(r["balance_weight"]),
               float(r["z_weight"]), r["inference"], r["gating"], float(r["alpha"]))


RECURSION_GRADIENTS = ("last_cycle", "one_step")
RECURSION_HALTINGS = ("none", "bce", "q_learning")


def recursion_config() -> ml_collections.ConfigDict:
  """Latent recursion with deep supervision (TRM, Jolicoeur-Martineau 2025; HRM, Wang et al.
  2025): one small net updates a latent z from (z, y, x) ``latent_steps`` times, then the
  answer y from (y, z); ``cycles`` such cycles make one supervision step; each example gets
  up to ``supervision_steps`` of them with the carry (y, z) detached in between
  (xlps.models.controllers.recursion). ``model.num_layers`` is derived:
  cycles x (latent_steps + 1) x net_layers applied layers."""
  r = ml_collections.ConfigDict()
  r.net_layers = 0             # layers of the recursed net (TRM: 2); 0 = no recursion
  r.latent_steps = 6           # n: z <- net(z + y + x) per cycle (TRM: 6; HRM: L_cycles)
  r.cycles = 3                 # T: cycles per supervision step (TRM: 3; HRM: H_cycles)
  r.gradient = "last_cycle"    # last_cycle (TRM: the first T - 1 cycles run without gradient)
                               # | one_step (HRM: only the last z and y updates train)
  r.separate_nets = False      # HRM: y updates run their own net (H), z updates theirs (L)
  r.supervision_steps = 16     # N_sup: supervision steps per example, one optimizer update each
  r.eval_supervision_steps = 0  # at evaluation (may exceed training's); 0 = supervision_steps
  r.halting = "bce"            # none | bce (TRM: BCE(q_halt, answer exactly right)) |
                               # q_learning (HRM: halt / continue Q-values, bootstrapped target)
  r.halt_exploration = 0.1     # training: share of examples that run at least a random 2..N_sup
  r.halt_loss_weight = 0.5     # weight of the halting head's loss (TRM / HRM: 0.5)
  r.eval_halting = True        # evaluation answers at the halting head's step (else the last)
  return r


@dataclasses.dataclass(frozen=True)
class RecursionSpec:
  """Validated ``model.recursion`` (present only when ``net_layers > 0``)."""

  net_layers: int
  latent_steps: int
  cycles: int
  gradient: str
  separate_nets: bool
  supervision_steps: int
  eval_supervision_steps: int
  halting: str
  halt_exploration: float
  halt_loss_weight: float
  eval_halting: bool

  @property
  def num_layers(self) -> int:
    """Applied layers of one supervision step."""
    return self.cycles * (self.latent_steps + 1) * self.net_layers

  @property
  def no_grad_layers(self) -> int:
    """The leading applied layers that train no gradient (a static prefix)."""
    applications = self.cycles * (self.latent_steps + 1)
    trained = self.latent_steps + 1 if self.gradient == "last_cycle" else min(2, applications)
    return (applications - trained) * self.net_layers

  def sharing(self) -> dict:
    """The slot table: layer j of every application reads slot j; with ``separate_nets``
    the y updates read slots net_layers + j (HRM's H net)."""
    n, k = self.latent_steps + 1, self.net_layers
    slots = [i % k + (k if self.separate_nets and (i // k) % n == n - 1 else 0)
             for i in range(self.num_layers)]
    return {"num_unique": 0, "order": "table", "table": " ".join(map(str, slots))}

  @classmethod
  def from_config(cls, m: Mapping, field: str) -> "RecursionSpec | None":
    r = m["recursion"]
    for key, lo in (("net_layers", 0), ("latent_steps", 1), ("cycles", 1),
                    ("supervision_steps", 1), ("eval_supervision_steps", 0)):
      check_int(f"{field}.{key}", r[key], lo)
    check_choice(f"{field}.gradient", r["gradient"], RECURSION_GRADIENTS)
    check_choice(f"{field}.halting", r["halting"], RECURSION_HALTINGS)
    check_bool(f"{field}.separate_nets", r["separate_nets"])
    check_bool(f"{field}.eval_halting", r["eval_halting"])
    check_number(f"{field}.halt_exploration", r["halt_exploration"], 0, 1)
    check_number(f"{field}.halt_loss_weight", r["halt_loss_weight"], 0)
    if r["net_layers"] == 0:
      default = recursion_config()
      changed = [k for k in r if r[k] != default[k]]
      if changed:
        raise ConfigError(f"{field}.{changed[0]}={r[changed[0]]!r} is only read with latent "
                          f"recursion, and {field}.net_layers=0 (none): set net_layers > 0 "
                          f"(TRM: 2), or leave {field}.{changed[0]} at its default")
      return None
    if m["family"] != "puzzle":
      raise ConfigError(f"{field}.net_layers={r['net_layers']} needs model.family='puzzle' "
                        f"(family is {m['family']!r})")
    spec = cls(r["net_layers"], r["latent_steps"], r["cycles"], r["gradient"],
               bool(r["separate_nets"]), r["supervision_steps"],
               r["eval_supervision_steps"] or r["supervision_steps"], r["halting"],
               float(r["halt_exploration"]), float(r["halt_loss_weight"]),
               bool(r["eval_halting"]))
    if m["num_layers"] != spec.num_layers:
      raise ConfigError(f"model.num_layers={m['num_layers']} is not what {field} applies per "
                        f"supervision step: cycles {spec.cycles} x (latent_steps "
                        f"{spec.latent_steps} + 1) x net_layers {spec.net_layers} = "
                        f"{spec.num_layers}; valid: model.num_layers={spec.num_layers}")
    default = sharing_config()
    if any(m["sharing"][k] != default[k] for k in ("num_unique", "order", "table")):
      raise ConfigError(f"{field}.net_layers={r['net_layers']} defines the sharing table (one "
                        "net applied at every step); leave model.sharing at its defaults")
    return spec
