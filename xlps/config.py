"""The config schema: every section's keys and defaults, and one ``validate(config)``.

``base_config()`` is a full experiment config (``seed``, ``model``, ``data``, ``train``,
``mesh``), each section listing every key with a one-line comment; experiment files in
``configs/`` start from it and override. ``validate`` checks every section and every
cross-section constraint before any data is read or anything is traced, and raises
``ConfigError`` naming the field, the value and what would be valid. ``ModelSpec`` is the
validated, frozen model section that Flax modules receive.

Importing this module is light (ml_collections and the pure-Python sharing plans): config
files import it without pulling in JAX's trainer, Orbax, grain or TFDS.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
import traceback
from collections.abc import Mapping

import ml_collections
from ml_collections import config_dict

from xlps import families as families_lib
from xlps import sharing as sharing_lib


class ConfigError(ValueError):
  """Bad configuration or command-line input. ``launch/`` prints the message and exits 2;
  every other exception keeps its traceback."""


ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "swiglu")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("learned", "sinusoidal", "none")
DTYPES = ("float32", "bfloat16")
# Attention kernels (xlps.models.layers.Attention): jax.nn.dot_product_attention's "xla" and
# "cudnn" backends, the hand-written "einsum" path, or "auto" choosing among them.
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "einsum")
# Zero-argument policies of jax.checkpoint_policies usable as remat policies; "none"
# disables remat, "full" rematerialises everything (nn.remat without a policy).
REMAT_POLICIES = ("none", "full", "nothing_saveable", "everything_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable")


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


def model_config() -> ml_collections.ConfigDict:
  """Every model key with its default (a small fully tied pre-LN decoder LM)."""
  m = ml_collections.ConfigDict()
  m.family = "decoder_lm"          # xlps.families: decoder_lm | encoder_mlm | encoder_decoder
  m.vocab_size = 260               # the byte tokenizer: 256 bytes + 4 special ids
  m.d_model = 256                  # H: hidden size
  m.embed_dim = 0                  # E: embedding size; 0 = d_model; E < H adds an E->H projection
  m.num_heads = 4                  # attention heads
  m.num_kv_heads = 0               # K/V heads (MQA = 1, GQA < heads); 0 = num_heads
  m.d_ff = 1024                    # FFN inner size
  m.num_layers = 6                 # N: applied depth (encoder depth for encoder_decoder)
  m.num_decoder_layers = 0         # applied decoder depth for encoder_decoder; 0 = num_layers
  m.activation = "gelu"            # relu | gelu | gelu_tanh | swiglu
  m.norm = "layernorm"             # layernorm | rmsnorm
  m.norm_eps = 1e-6                # epsilon of every norm
  m.norm_position = "pre"          # pre | post (ALBERT / BERT / original Transformer: post)
  m.embed_norm = False             # norm over the embeddings (BERT / ALBERT: True)
  m.position_embedding = "learned"  # learned | sinusoidal | none
  m.scale_embeddings = False       # token embeddings x sqrt(E) (Vaswani et al. 3.4): with
                                   # sinusoidal positions, else N(0, 0.02) tokens drown in them
  m.max_len = 512                  # positions available (learned) and FLOP accounting length
  m.type_vocab_size = 0            # segment embeddings (BERT / ALBERT: 2); 0 = none
  m.use_bias = True                # biases in dense layers
  m.tie_embeddings = True          # output projection = input embedding (transposed)
  m.tie_encoder_decoder = False    # decoder reuses the encoder's self-attention and FFN
  m.pooler = False                 # BERT/ALBERT pooler (dense+tanh on the first token)
  m.dropout_rate = 0.0             # residual / embedding dropout
  m.attention_dropout_rate = 0.0   # dropout on attention probabilities
  m.attention_impl = "auto"        # auto | xla | cudnn | einsum; auto: einsum while attention
                                   # dropout applies, else cuDNN flash on NVIDIA bf16, else XLA
  m.init_std = 0.02                # kernel / embedding init: N(0, init_std) cut at +-2 init_std
  m.dtype = "float32"              # compute dtype: float32 | bfloat16 (params stay float32)
  m.scan_layers = True             # one nn.scan over applied depth; False = unrolled reference
  m.remat_policy = "none"          # none | full | a jax.checkpoint_policies name
  m.remat_group_size = 0           # two-level remat: scan groups of k layers, saving only each
                                   # group's input; 0 = off, -1 = k nearest sqrt(N) dividing N
  m.sharing = sharing_config()
  m.kv_sharing = kv_sharing_config()
  m.act = act_config()
  m.loop = loop_config()
  m.lora = lora_config()
  m.routing = routing_config()
  return m


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


ROUTINGS = ("none", "expert_choice", "token_choice")


def routing_config() -> ml_collections.ConfigDict:
  """Token-level recursion routing over a looped core (Mixture-of-Recursions, Bae et al. 2025):
  a router picks which positions run each core iteration (xlps.models.engine.route)."""
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


ROUTING_GATINGS = ("residual", "interpolate")


ACT_UPDATES = ("accumulate", "interpolate")
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


def act_config(enabled: bool = False) -> ml_collections.ConfigDict:
  """Adaptive Computation Time over each stack's applied depth (Graves 2016; the Universal
  Transformer's per-position halting, Dehghani et al. 2018): xlps.models.engine.act_step."""
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


def kv_sharing_config(policy: str = "per_layer", group_size: int = 0,
                      table: str = "") -> ml_collections.ConfigDict:
  """Which applied layers share self-attention K/V (xlps.sharing.KVPlan): part of the model,
  trained and decoded alike."""
  k = ml_collections.ConfigDict()
  k.policy = policy            # per_layer | cross_layer (CLA) | recursive (MoR) | table
  k.group_size = group_size    # cross_layer: layers per K/V group (2 = CLA2); else 0
  k.table = table              # policy='table': entry read by each applied layer, "0 1 2 2"
  return k


def parse_arg(arg: str | None, **defaults):
  """big_vision-style ``get_config`` argument: ``"base"`` or ``"variant=base,runlocal"``.

  A bare word sets the first default key (or a bool default to True); ``key=value`` pairs
  are converted to the default's type. Unknown keys raise ConfigError.
  """
  result = dict(defaults)
  first = next(iter(defaults))
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep:
      if isinstance(defaults.get(key), bool):
        result[key] = True
        continue
      key, value = first, item
    if key not in defaults:
      raise ConfigError(f"config argument {key!r} is unknown; valid: {', '.join(defaults)}")
    kind = type(defaults[key])
    result[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return ml_collections.ConfigDict(result)


def did_you_mean(value, valid) -> str:
  """``"; did you mean X?"`` for the closest of ``valid`` to a mistyped ``value`` (else "")."""
  if not isinstance(value, str):
    return ""
  close = difflib.get_close_matches(value, [str(v) for v in valid], n=1)
  return f"; did you mean {close[0]}?" if close else ""


def _then_valid(value, valid) -> str:
  """``"; did you mean X? "`` or ``"; "``: what goes between an error and its valid list."""
  hint = did_you_mean(value, valid)
  return f"{hint} " if hint else "; "


def unknown_key(field: str, key: str, known, what: str, valid: str | None = None) -> ConfigError:
  """The error for ``field.key`` missing from a section's schema (a typo, most often)."""
  valid = ", ".join(known) if valid is None else valid
  return ConfigError(f"{field}.{key} is not a {what} key{_then_valid(key, known)}"
                     f"valid keys: {valid}")


def check_choice(field: str, value, valid: tuple) -> None:
  if value not in valid:
    raise ConfigError(f"{field}={value!r} is not valid; choose one of: "
                      f"{', '.join(map(str, valid))}{did_you_mean(value, valid)}")


def check_bool(field: str, value) -> None:
  if not isinstance(value, bool):
    raise ConfigError(f"{field}={value!r} must be a bool; valid: True, False")


def check_str(field: str, value) -> None:
  if not isinstance(value, str):
    raise ConfigError(f"{field}={value!r} must be a string")


def check_number(field: str, value, lo: float, hi: float | None = None, *,
                 integer: bool = False, open_lo: bool = False, open_hi: bool = False) -> None:
  """ConfigError naming ``field`` unless ``lo <= value <= hi`` (``lo <`` with ``open_lo``,
  ``< hi`` with ``open_hi``)."""
  kinds = (int,) if integer else (int, float)
  wrong_type = isinstance(value, bool) or not isinstance(value, kinds)
  below = not wrong_type and (value <= lo if open_lo else value < lo)
  above = not wrong_type and hi is not None and (value >= hi if open_hi else value > hi)
  if wrong_type or below or above:
    what = "an integer" if integer else "a number"
    bound = "" if hi is None else f" and {'<' if open_hi else '<='} {hi}"
    raise ConfigError(f"{field}={value!r} must be {what} {'>' if open_lo else '>='} {lo}{bound}")


def check_int(field: str, value, minimum: int) -> None:
  check_number(field, value, minimum, integer=True)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Validated, hashable model hyper-parameters (what Flax modules receive)."""

  family: str
  vocab_size: int
  d_model: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  d_ff: int
  num_layers: int
  num_decoder_layers: int
  activation: str
  norm: str
  norm_eps: float
  norm_position: str
  embed_norm: bool
  position_embedding: str
  scale_embeddings: bool
  max_len: int
  type_vocab_size: int
  use_bias: bool
  tie_embeddings: bool
  tie_encoder_decoder: bool
  pooler: bool
  dropout_rate: float
  attention_dropout_rate: float
  attention_impl: str
  init_std: float
  dtype: str
  scan_layers: bool
  remat_policy: str
  remat_group_size: int
  act: "ActSpec | None"            # adaptive computation time; None = fixed depth
  loop: "LoopSpec | None"          # prelude / iterated core / coda; None = plain depth
  lora: "LoraSpec | None"          # per-applied-layer adapters; None = plain tying
  routing: "RoutingSpec | None"    # per-position recursion routing of a looped core
  # Each stack's applied depth: per component, its sharing plan and parameter group.
  stacks: tuple[sharing_lib.StackPlan, ...]

  def stack(self, name: str) -> sharing_lib.StackPlan:
    return next(s for s in self.stacks if s.name == name)

  def stack_plans(self, name: str) -> dict[str, sharing_lib.Plan]:
    return self.stack(name).plans

  def groups(self) -> dict[tuple[str, ...], sharing_lib.Group]:
    """Parameter path -> the group stored there and every component that applies it."""
    return sharing_lib.parameter_groups(self.stacks)

  @classmethod
  def from_config(cls, m: Mapping, field: str = "model") -> "ModelSpec":
    """Validates ``config.model`` and resolves defaults (0 = derived)."""
    f = lambda k: f"{field}.{k}"  # noqa: E731
    check_known_keys(m, field)
    check_choice(f("family"), m["family"], tuple(families_lib.FAMILIES))
    for key, lo in (("vocab_size", 2), ("d_model", 1), ("num_heads", 1), ("d_ff", 1),
                    ("num_layers", 1), ("max_len", 1), ("embed_dim", 0), ("num_kv_heads", 0),
                    ("num_decoder_layers", 0), ("type_vocab_size", 0)):
      check_int(f(key), m[key], lo)
    d, h = m["d_model"], m["num_heads"]
    if d % h:
      valid = [x for x in range(1, d + 1) if d % x == 0 and x <= 128]
      raise ConfigError(f"{f('num_heads')}={h} does not divide {f('d_model')}={d}; "
                        f"valid num_heads: {valid}")
    kv = m["num_kv_heads"] or h
    if h % kv:
      valid = [x for x in range(1, h + 1) if h % x == 0]
      raise ConfigError(f"{f('num_kv_heads')}={kv} does not divide {f('num_heads')}={h}; "
                        f"valid num_kv_heads: {valid} (1 = multi-query, {h} = multi-head)")
    embed_dim = m["embed_dim"] or d
    if embed_dim > d:
      raise ConfigError(f"{f('embed_dim')}={embed_dim} exceeds {f('d_model')}={d}; the factorized "
                        "embedding needs embed_dim <= d_model (0 = d_model)")
    check_choice(f("activation"), m["activation"], ACTIVATIONS)
    check_choice(f("norm"), m["norm"], NORMS)
    check_choice(f("norm_position"), m["norm_position"], NORM_POSITIONS)
    check_choice(f("position_embedding"), m["position_embedding"], POSITIONS)
    check_choice(f("dtype"), m["dtype"], DTYPES)
    check_choice(f("remat_policy"), m["remat_policy"], REMAT_POLICIES)
    check_int(f("remat_group_size"), m["remat_group_size"], -1)
    for key in ("dropout_rate", "attention_dropout_rate"):
      check_number(f(key), m[key], 0, 1, open_hi=True)
    impl, attention_dropout = m["attention_impl"], m["attention_dropout_rate"]
    check_choice(f("attention_impl"), impl, ATTENTION_IMPLS)
    if impl in ("xla", "cudnn") and attention_dropout > 0:
      raise ConfigError(f"{f('attention_impl')}={impl!r} has no dropout on attention "
                        f"probabilities but {f('attention_dropout_rate')}={attention_dropout}; "
                        "valid: attention_impl 'einsum' or 'auto' (einsum while that dropout "
                        "applies), or attention_dropout_rate=0")
    if impl == "cudnn" and m["dtype"] != "bfloat16":
      raise ConfigError(f"{f('attention_impl')}='cudnn' needs {f('dtype')}='bfloat16' (cuDNN "
                        f"flash attention takes bf16 only; dtype is {m['dtype']!r}); valid: "
                        "dtype='bfloat16', or attention_impl 'auto', 'xla' or 'einsum'")
    check_number(f("norm_eps"), m["norm_eps"], 0)
    check_number(f("init_std"), m["init_std"], 0)
    for key in ("embed_norm", "scale_embeddings", "use_bias", "tie_embeddings", "tie_encoder_decoder", "pooler",
                "scan_layers"):
      check_bool(f(key), m[key])
    if m["tie_encoder_decoder"] and m["family"] != "encoder_decoder":
      raise ConfigError(f"{f('tie_encoder_decoder')}=True needs {f('family')}='encoder_decoder' "
                        f"(family is {m['family']!r})")

    loop = LoopSpec.from_config(m, f("loop"))
    plan_sharing = m["sharing"] if loop is None else loop.sharing()
    try:  # xlps.sharing is plain Python: its errors are ValueErrors
      stacks = tuple(sharing_lib.stack_plan(st.name, st.num_layers, st.components, st.groups,
                                            plan_sharing, f("sharing"), m["kv_sharing"])
                     for st in families_lib.FAMILIES[m["family"]].stacks(m))
      sharing_lib.parameter_groups(stacks)
    except ValueError as e:
      raise ConfigError(str(e)) from None
    check_remat_group(m["remat_group_size"], m["scan_layers"], stacks, f("remat_group_size"))
    act = ActSpec.from_config(m["act"], f("act"))
    if act is not None and loop is not None:
      raise ConfigError(f"{f('act.enabled')}=True and {f('loop.core')}={loop.core}: ACT halting "
                        "and a looped core are two ways to choose depth; enable one of them")
    lora = LoraSpec.from_config(m, f("lora"))
    routing = RoutingSpec.from_config(m["routing"], loop, f("routing"))
    return cls(
        family=m["family"], vocab_size=m["vocab_size"], d_model=d, embed_dim=embed_dim,
        num_heads=h, num_kv_heads=kv, head_dim=d // h, d_ff=m["d_ff"],
        num_layers=m["num_layers"], num_decoder_layers=m["num_decoder_layers"] or m["num_layers"],
        activation=m["activation"],
        norm=m["norm"], norm_eps=float(m["norm_eps"]), norm_position=m["norm_position"],
        embed_norm=bool(m["embed_norm"]), position_embedding=m["position_embedding"],
        scale_embeddings=bool(m["scale_embeddings"]),
        max_len=m["max_len"], type_vocab_size=m["type_vocab_size"], use_bias=bool(m["use_bias"]),
        tie_embeddings=bool(m["tie_embeddings"]),
        tie_encoder_decoder=bool(m["tie_encoder_decoder"]), pooler=bool(m["pooler"]),
        dropout_rate=float(m["dropout_rate"]),
        attention_dropout_rate=float(m["attention_dropout_rate"]),
        attention_impl=impl, init_std=float(m["init_std"]), dtype=m["dtype"],
        scan_layers=bool(m["scan_layers"]),
        remat_policy=m["remat_policy"], remat_group_size=m["remat_group_size"], act=act, loop=loop,
        lora=lora, routing=routing, stacks=stacks)


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


def check_devices(spec: ModelSpec) -> None:
  """What this machine must have for ``spec`` to run here (``launch.train`` asks before any
  work; planning a config elsewhere does not): cuDNN attention needs an NVIDIA GPU."""
  if spec.attention_impl != "cudnn":
    return
  import jax
  device = jax.devices()[0]
  if device.platform != "gpu" or not device.device_kind.startswith("NVIDIA"):
    raise ConfigError(f"model.attention_impl='cudnn' needs an NVIDIA GPU (cuDNN flash "
                      f"attention); this machine runs on {device.platform} "
                      f"({device.device_kind}); valid here: auto, xla, einsum")


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


def check_remat_group(size: int, scan_layers: bool, stacks, field: str) -> None:
  """Two-level remat needs the scanned engine and a group size dividing every stack's depth."""
  if size and not scan_layers:
    raise ConfigError(f"{field}={size} needs model.scan_layers=True (the unrolled reference "
                      "has no scan to nest); valid: 0 with scan_layers=False")
  for stack in stacks if size > 0 else ():
    if stack.num_layers % size:
      valid = [k for k in range(1, stack.num_layers + 1) if stack.num_layers % k == 0]
      raise ConfigError(f"{field}={size} does not divide the {stack.name} stack's depth "
                        f"{stack.num_layers}; valid: 0 (off), -1 (auto, about sqrt of the "
                        f"depth) or a divisor of it: {valid}")


def remat_group_size(size: int, num_layers: int) -> int:
  """Layers per rematerialised group of a stack of ``num_layers``; 0 = one-level scan.

  ``size = -1`` picks the divisor of ``num_layers`` nearest sqrt(num_layers), which keeps
  about ``N/k + k`` layer inputs alive instead of N."""
  if size >= 0:
    return size
  divisors = [k for k in range(1, num_layers + 1) if num_layers % k == 0]
  return min(divisors, key=lambda k: (abs(k - math.sqrt(num_layers)), k))


def check_known_keys(m: Mapping, field: str = "model") -> None:
  """Rejects keys that ``model_config()`` does not define (typos in experiment files)."""
  known = model_config()
  for key in m:
    if key not in known:
      raise unknown_key(field, key, sorted(known), "model")
  sections = (Mapping, ml_collections.ConfigDict)
  sharing = m.get("sharing")
  if isinstance(sharing, sections):  # sharing.py names bad keys too; here with a suggestion
    plan_keys = ("num_unique", "order", "table")
    for key in sharing:
      if key not in plan_keys and key not in sharing_lib.COMPONENTS:
        raise unknown_key(f"{field}.sharing", key, plan_keys + sharing_lib.COMPONENTS, "sharing",
                          f"{', '.join(plan_keys)} and components "
                          f"{', '.join(sharing_lib.COMPONENTS)}")
      if key in sharing_lib.COMPONENTS and isinstance(sharing[key], sections):
        for sub in sharing[key]:
          if sub not in plan_keys:
            raise unknown_key(f"{field}.sharing.{key}", sub, plan_keys, "sharing")
  for name, schema in (("kv_sharing", kv_sharing_config()), ("act", act_config()),
                       ("loop", loop_config()), ("lora", lora_config()),
                       ("routing", routing_config())):
    section = m.get(name)
    if isinstance(section, sections):
      for key in section:
        if key not in schema:
          raise unknown_key(f"{field}.{name}", key, tuple(schema), name)


# ----------------------------------------------------------------------------- data

DATA_NAMES = ("stdlib", "algorithmic", "text_files", "tfds")
TASKS = ("copy", "reverse", "addition")
TOKENIZERS = ("byte", "sentencepiece", "file")


def data_config() -> ml_collections.ConfigDict:
  """Every data key with its default (the stdlib byte corpus)."""
  d = ml_collections.ConfigDict()
  d.name = "stdlib"          # stdlib | algorithmic | text_files | tfds
  d.task = "copy"            # algorithmic: copy | reverse | addition
  d.glob = ""                # text_files: glob of the user's files (one document per file)
  d.tfds_name = ""           # tfds: a prepared dataset, e.g. "lm1b" or "wiki40b/en"
  d.text_key = "text"        # tfds: feature holding the text
  d.train_split = "train"    # tfds: split to train on
  d.eval_split = "validation"  # tfds: split to evaluate on
  d.data_dir = ""            # prepared TFDS data; "" = $TFDS_DATA_DIR or ~/tensorflow_datasets
  d.seq_len = 128            # tokens per example (packed LM length; max source/target length)
  d.tokenizer = "byte"       # byte | sentencepiece (trained here) | file (data.tokenizer_path)
  d.sp_vocab_size = 1024     # sentencepiece: vocab trained locally on the train split
  d.tokenizer_path = ""      # file: a SentencePiece .model, an HF tokenizer.json or a local HF
                             # snapshot directory; a run keeps a copy in WORKDIR/tokenizer
  d.mlm_probability = 0.15   # encoder_mlm: tokens selected (80% MASK, 10% random, 10% kept)
  d.train_min_len = 1        # algorithmic: shortest train/test operand length
  d.train_max_len = 20       # algorithmic: longest train/test operand length
  d.test_max_len = 40        # algorithmic: test_long lengths are train_max_len+1..test_max_len
  d.num_train_examples = 20000  # algorithmic: train split size
  d.num_eval_examples = 1000    # algorithmic: size of test and of test_long
  d.eval_batches = 8         # number of eval batches per split (0 = whole split)
  d.worker_count = 0         # grain worker processes (0 = in-process); resume with the same value
  d.num_shards = 0            # train-data shards (a multiple of the process count); 0 = one per
                              # process. Fix it to keep the exact data order across restarts
                              # on a different number of processes.
  return d


def seq2seq_length(task: str, max_len: int, layout: str) -> int:
  """The ``data.seq_len`` a ``task`` example with operands up to ``max_len`` needs in
  ``layout`` (``lm``: ``source EOS target EOS`` in one row; ``seq2seq``: the longer side)."""
  source, target = max_lengths(task, max_len)
  return source + target + 1 if layout == "lm" else max(source, target + 1)


def max_lengths(task: str, max_len: int) -> tuple[int, int]:
  """Longest (source, target) of ``task`` at operand length ``max_len`` (target w/o EOS)."""
  if task == "addition":
    return 2 * max_len + 1, max_len + 1
  return max_len, max_len


def check_data(config: ml_collections.ConfigDict, process_index: int = 0,
               process_count: int = 1) -> None:
  """The data section and what it must agree with (family, batch, processes)."""
  d, known = config.data, data_config()
  for key in d:
    if key not in known:
      raise unknown_key("data", key, tuple(known), "data")
  check_choice("data.name", d.name, DATA_NAMES)
  check_choice("data.task", d.task, TASKS)
  check_choice("data.tokenizer", d.tokenizer, TOKENIZERS)
  check_choice("model.family", config.model.family, tuple(families_lib.FAMILIES))
  for key, minimum in (("seq_len", 2), ("sp_vocab_size", 1), ("train_min_len", 1),
                       ("num_train_examples", 1), ("num_eval_examples", 1), ("eval_batches", 0),
                       ("worker_count", 0), ("num_shards", 0)):
    check_int(f"data.{key}", d[key], minimum)
  check_int("data.train_max_len", d.train_max_len, d.train_min_len)
  check_int("data.test_max_len", d.test_max_len, d.train_max_len + 1)
  for key in ("glob", "tfds_name", "text_key", "train_split", "eval_split", "data_dir",
              "tokenizer_path"):
    check_str(f"data.{key}", d[key])
  if d.tokenizer_path and d.tokenizer != "file":
    raise ConfigError(f"data.tokenizer_path={d.tokenizer_path!r} is only read with "
                      f"data.tokenizer='file' (not {d.tokenizer!r}); valid: data.tokenizer=file, "
                      "or data.tokenizer_path=''")
  if (isinstance(d.mlm_probability, bool) or not isinstance(d.mlm_probability, (int, float))
      or not 0.0 < d.mlm_probability < 1.0):
    raise ConfigError(f"data.mlm_probability={d.mlm_probability!r} must be a number in (0, 1)")
  batch = config.train.batch_size
  check_int("train.batch_size", batch, 1)
  check_int("process_count", process_count, 1)
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} must be in [0, {process_count})")
  if batch % process_count:
    raise ConfigError(f"train.batch_size={batch} (global) is not divisible by "
                      f"process_count={process_count}; use a multiple of {process_count}")
  shards = d.num_shards or process_count
  if shards % process_count or batch % shards:
    raise ConfigError(f"data.num_shards={d.num_shards} must be a multiple of process_count="
                      f"{process_count} that divides train.batch_size={batch} (0 = one shard "
                      "per process)")
  kind = "seq2seq" if d.name == "algorithmic" else "text"
  layout = families_lib.FAMILIES[config.model.family].layout
  if kind not in families_lib.LAYOUT_DATASETS[layout]:
    fitting = [name for name, fam in families_lib.FAMILIES.items()
               if kind in families_lib.LAYOUT_DATASETS[fam.layout]]
    raise ConfigError(f"model.family={config.model.family!r} does not fit data.name={d.name!r}; "
                      f"valid families: {', '.join(fitting)}")
  if kind == "seq2seq":
    if d.tokenizer != "byte":
      raise ConfigError(f"data.tokenizer={d.tokenizer!r}: algorithmic tasks use 'byte'")
    need = seq2seq_length(d.task, d.test_max_len, layout)
    if d.seq_len < need:
      raise ConfigError(f"data.seq_len={d.seq_len} is too small for task {d.task!r} with "
                        f"test_max_len={d.test_max_len} and family {config.model.family!r}: the "
                        f"longest example needs {need} tokens; set seq_len >= {need}")


# ---------------------------------------------------------------------------- train

NONFINITE = ("stop", "skip")
ON_MISMATCH = ("refuse", "restart")


def train_config() -> ml_collections.ConfigDict:
  """Every training key with its default."""
  t = ml_collections.ConfigDict()
  t.num_steps = 1000               # total optimizer steps (extend to continue a finished run
                                   # on its schedule: past its end at the final rate)
  t.batch_size = 32                # global batch size (examples)
  t.learning_rate = 1e-3           # peak learning rate
  t.warmup_steps = 100             # linear warmup steps (< num_steps unless decay_steps is set)
  t.end_lr_factor = 0.1            # cosine decays to learning_rate * end_lr_factor
  t.decay_steps = 0                # length of warmup + cosine; 0 = num_steps of the run's first
                                   # start (a resumed run keeps the schedule it started with)
  t.weight_decay = 0.01            # AdamW decoupled weight decay (kernels and embeddings only)
  t.b1 = 0.9                       # Adam beta1
  t.b2 = 0.98                      # Adam beta2
  t.grad_clip_norm = 1.0           # global-norm clipping; 0 = off
  t.log_every_steps = 50           # progress line + metrics.jsonl train entry (and at the end)
  t.eval_every_steps = 500         # evaluation on every eval split (and at the end)
  t.eval_iterations = ""           # looped models: also evaluate at these core iterations,
                                   # e.g. "1,2,4,8" (eval_loss_iter4, ...); "" = none
  t.checkpoint_every_steps = 500   # checkpoint interval (and at the end / on SIGTERM)
  t.keep_checkpoints = 3           # the newest checkpoints kept (older ones deleted) ...
  t.keep_every_steps = 0           # ... plus every checkpoint whose step is a multiple of this
                                   # (0 = none), MaxText-style preservation
  t.async_checkpoints = True       # save in the background while training continues
  t.peak_flops_per_device = 0.0    # for MFU; 0 = by device kind (CPU: measured matmul peak)
  t.nonfinite = "stop"             # NaN/Inf loss or gradients: stop (exit non-zero, nothing
                                   # saved) | skip (drop that update, count it in the logs)
  t.on_mismatch = "refuse"         # the workdir's checkpoints hold another model: refuse
                                   # (name the differing fields) | restart (move them aside,
                                   # start at step 0)
  return t


def eval_iterations(t: ml_collections.ConfigDict, spec: ModelSpec) -> tuple[int, ...]:
  """``train.eval_iterations`` parsed: core iterations the eval loop reports loss at."""
  text = t.eval_iterations
  check_str("train.eval_iterations", text)
  if not text.strip():
    return ()
  try:
    values = tuple(int(v) for v in text.replace(",", " ").split())
  except ValueError:
    raise ConfigError(f"train.eval_iterations={text!r} is not a list of integers, e.g. "
                      "'1,2,4,8'") from None
  if spec.loop is None:
    raise ConfigError(f"train.eval_iterations={text!r} needs a looped model "
                      "(model.loop.core > 0)")
  most = spec.loop.max_iterations
  if any(not 1 <= v <= most for v in values):
    raise ConfigError(f"train.eval_iterations={text!r}: each must be in 1..{most} (the "
                      f"iterations model.num_layers={spec.num_layers} holds)")
  return values


def check_train(t: ml_collections.ConfigDict) -> None:
  known = train_config()
  for key in t:
    if key not in known:
      raise unknown_key("train", key, tuple(known), "train")
  for key in ("num_steps", "batch_size", "log_every_steps", "eval_every_steps",
              "checkpoint_every_steps", "keep_checkpoints"):
    check_int(f"train.{key}", t[key], 1)
  for key in ("warmup_steps", "decay_steps", "keep_every_steps"):
    check_int(f"train.{key}", t[key], 0)
  check_choice("train.nonfinite", t.nonfinite, NONFINITE)
  check_choice("train.on_mismatch", t.on_mismatch, ON_MISMATCH)
  if (isinstance(t.learning_rate, bool) or not isinstance(t.learning_rate, (int, float))
      or t.learning_rate <= 0):
    raise ConfigError(f"train.learning_rate={t.learning_rate!r} must be a number > 0")
  check_bool("train.async_checkpoints", t.async_checkpoints)
  check_number("train.end_lr_factor", t.end_lr_factor, 0, 1)
  check_number("train.weight_decay", t.weight_decay, 0)
  check_number("train.grad_clip_norm", t.grad_clip_norm, 0)
  check_number("train.peak_flops_per_device", t.peak_flops_per_device, 0)
  for key in ("b1", "b2"):
    check_number(f"train.{key}", t[key], 0, 1, open_hi=True)
  if not t.decay_steps and t.warmup_steps >= t.num_steps:
    raise ConfigError(
        f"train.warmup_steps={t.warmup_steps} >= train.num_steps={t.num_steps}: the run ends "
        f"inside its warmup and the learning rate never reaches learning_rate="
        f"{t.learning_rate}; valid: warmup_steps < num_steps, or ask for it explicitly by "
        "setting train.decay_steps (the schedule's length: the run stops after num_steps of "
        "its updates)")


# ----------------------------------------------------------------------------- mesh

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
  known = mesh_config()
  for key in cfg:
    if key not in known:
      raise unknown_key("mesh", key, tuple(known), "mesh")
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
                        f"which no parameter or activation has{_then_valid(logical, LOGICAL_AXES)}"
                        f"valid logical axes: {', '.join(LOGICAL_AXES)}")
    names = axes if isinstance(axes, (tuple, list)) else (axes,)
    for name in names:
      if name is not None and name not in MESH_AXES or (name is None and len(names) > 1):
        raise ConfigError(f"mesh.rules entry {tuple(rule)!r} names the mesh axis {name!r}, which "
                          f"the mesh does not have{_then_valid(name, MESH_AXES)}valid mesh axes: "
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


# --------------------------------------------------------------------------- whole

def base_config() -> ml_collections.ConfigDict:
  """A full experiment config with every section at its defaults (configs/ start here)."""
  config = ml_collections.ConfigDict()
  config.seed = 0                  # init, dropout and data-order seed
  config.model = model_config()
  config.data = data_config()
  config.train = train_config()
  config.mesh = mesh_config()
  return config


# Model keys renamed since runs were saved (old -> new name in the same section).
RENAMED_MODEL_KEYS = {"act.update": "update_rule"}
# Model keys whose default changed: a saved section without them ran with these values.
SAVED_BEFORE_DEFAULTS = {"act.update_rule": "interpolate", "routing.gating": "interpolate"}


def upgrade_saved_model(model: Mapping) -> dict:
  """A saved ``config.model`` in today's keys: renamed keys moved, and keys whose default
  changed since set to the value the run was trained with (a section without them)."""
  model = {k: dict(v) if isinstance(v, Mapping) else v for k, v in model.items()}
  for old, new in RENAMED_MODEL_KEYS.items():
    section, key = old.split(".")
    if isinstance(model.get(section), dict) and key in model[section]:
      model[section][new] = model[section].pop(key)
  for path, value in SAVED_BEFORE_DEFAULTS.items():
    section, key = path.split(".")
    if isinstance(model.get(section), dict):
      model[section].setdefault(key, value)
  return model


def from_saved(values: Mapping) -> ml_collections.ConfigDict:
  """``base_config()`` with a saved config's ``values`` set key by key (checkpoint metadata,
  ``config.json``): keys saved before they existed keep their defaults (or, where a default
  changed, the value the run had: ``upgrade_saved_model``), types stay the schema's, and a
  saved key the schema lacks is a ConfigError naming it."""
  if isinstance(values.get("model"), Mapping):
    values = {**values, "model": upgrade_saved_model(values["model"])}
  config = base_config()
  _set_saved(config, values, prefix="")
  return config


def _set_saved(node: ml_collections.ConfigDict, values: Mapping, prefix: str) -> None:
  for key, value in values.items():
    name = prefix + key
    if key not in node:
      raise ConfigError(f"saved config key {name} is not an xlps config key; valid keys "
                        f"here: {', '.join(sorted(node))}")
    if isinstance(node[key], ml_collections.ConfigDict):
      if not isinstance(value, Mapping):
        raise ConfigError(f"saved config key {name}={value!r} must be a section (a JSON object)")
      _set_saved(node[key], value, prefix=f"{name}.")
      continue
    try:
      node[key] = value
    except TypeError as e:
      raise ConfigError(f"saved config key {name}={value!r}: {e}") from None


def validate(config: ml_collections.ConfigDict, process_count: int = 1,
             num_devices: int | None = None) -> ModelSpec:
  """Checks every section and every cross-section constraint; returns the model spec.

  Runs before any data is read or anything traced. ``num_devices`` defaults to
  ``jax.device_count()`` (imported only then).
  """
  sections = ("seed", "model", "data", "train", "mesh")
  for key in config:
    if key not in sections:
      raise ConfigError(f"{key} is not a config section{_then_valid(key, sections)}valid: "
                        f"{', '.join(sections)}")
  check_int("seed", config.seed, 0)
  spec = ModelSpec.from_config(config.model)
  check_train(config.train)
  check_data(config, 0, process_count)
  d = config.data
  if spec.position_embedding != "none" and d.seq_len > spec.max_len:
    raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_len={spec.max_len}: positions "
                      f"beyond max_len have no embedding; set model.max_len >= {d.seq_len} or "
                      f"data.seq_len <= {spec.max_len}")
  vocab = None  # data.tokenizer='file': known once loaded (xlps.data checks it then)
  if d.tokenizer == "byte":
    from xlps.data import tokenizers  # the byte vocabulary is the tokenizer's to define
    vocab = tokenizers.BYTE_VOCAB_SIZE
  elif d.tokenizer == "sentencepiece":
    vocab = d.sp_vocab_size
  if vocab is not None and vocab > spec.vocab_size:
    raise ConfigError(f"model.vocab_size={spec.vocab_size} is smaller than the {d.tokenizer} "
                      f"tokenizer's vocabulary ({vocab}); set model.vocab_size >= {vocab}")
  eval_iterations(config.train, spec)
  check_mesh(config.mesh)
  if num_devices is None:
    import jax
    num_devices = jax.device_count()
  shape = dict(zip(MESH_AXES, mesh_shape(config.mesh, num_devices)))
  batch_shards = shape["data"] * shape["fsdp"]
  if config.train.batch_size % batch_shards:
    raise ConfigError(f"train.batch_size={config.train.batch_size} must be a multiple of the "
                      f"mesh's data x fsdp = {shape['data']} x {shape['fsdp']} = {batch_shards} "
                      "batch shards")
  return spec


def check_override(key: str, value: str) -> None:
  """A ``--config.KEY=VALUE`` command-line override against the schema (``base_config()``):
  ConfigError for a key no section has (with a suggestion) or a value that cannot be the
  key's type. ``launch/`` calls it when the flag library rejects an override."""
  node, field = base_config(), ""
  parts = key.split(".")
  for i, part in enumerate(parts):
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"--config.{key}: {field}={node!r} has no keys; override {field} itself")
    if part not in node:
      known = tuple(node)
      if not field:
        raise ConfigError(f"{part} is not a config section{_then_valid(part, known)}valid: "
                          f"{', '.join(known)}")
      raise unknown_key(field, part, known, "sharing" if ".sharing" in field else field)
    kind = node.get_type(part) if i == len(parts) - 1 else None
    node, field = node[part], f"{field}.{part}" if field else part
  if isinstance(node, ml_collections.ConfigDict):
    return  # a whole section given as a dict literal: validate() checks its keys
  try:
    if kind is bool:
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError
    elif kind in (int, float):
      kind(value)
  except (TypeError, ValueError):
    what = {bool: "a bool (true / false)", int: "an integer", float: "a number"}[kind]
    raise ConfigError(f"{field}={value!r} (from --config.{key}) is not {what}; valid: {what}, "
                      f"e.g. the default {node!r}") from None


def _config_spec(argv) -> str | None:
  """The value of ``--config`` in ``argv`` (``path`` or ``path:arg``), if given."""
  for i, arg in enumerate(argv):
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
  return None


def _raised_in(path: str, error: BaseException) -> tuple[BaseException, int] | None:
  """The innermost exception in ``error``'s chain raised from the file ``path``, and its line."""
  target, found, seen = os.path.realpath(path), None, set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, SyntaxError) and error.filename and \
        os.path.realpath(error.filename) == target:
      found = (error, error.lineno or 0)
    lines = [f.lineno for f in traceback.extract_tb(error.__traceback__)
             if os.path.realpath(f.filename) == target]
    if lines:
      found = (error, lines[-1])
    error = error.__cause__ or error.__context__
  return found


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return lines[0] if lines else ""


def parse_config_flags(argv: list[str], config_flag) -> list[str]:
  """absl's flag parsing for a ``launch`` script with ``config_flag`` (its
  ``DEFINE_config_file``), except that bad config input (a missing config file, a
  ``get_config`` that raises, an unknown or mistyped ``--config.KEY``) is one line on stderr
  and exit status 2."""
  from absl import flags
  try:
    rest = flags.FLAGS(argv)
    config_flag.value.get("seed")  # config_flags defers a file's load error to the first access
    return rest
  except Exception as e:  # flags.Error, or whatever the config file raised
    print(f"error: {config_flag_error(argv, e)}", file=sys.stderr)
    sys.exit(2)


def config_flag_error(argv, error: BaseException) -> str:
  """One line for a failure to parse ``--config`` and its ``--config.KEY=VALUE`` overrides.

  ml_collections defers a missing config file to the config's first use, wraps what
  ``get_config`` raises in the flag library's errors (with a traceback in the message), and
  reports an unknown override as a KeyError; this names the file, the key and what is valid.
  """
  spec = _config_spec(argv)
  if spec:
    path = spec.split(":", 1)[0]
    if not os.path.isfile(path):
      return (f"--config={spec}: the config file {path!r} does not exist (relative to "
              f"{os.getcwd()}); valid: a Python file with get_config(), e.g. configs/default.py "
              "or configs/default.py:runlocal")
    raised = _raised_in(path, error)
    if raised is not None:
      exc, line = raised
      if isinstance(exc, ConfigError):
        return f"--config={spec}: {_first_line(exc)}"
      return f"--config={spec}: {path}:{line} raised {type(exc).__name__}: {_first_line(exc)}"
  for arg in argv:
    match = re.match(r"--?config\.([^=]+)=(.*)$", arg, re.S)
    if match:
      try:
        check_override(*match.groups())
      except ConfigError as e:
        return str(e)
  return _first_line(error) or type(error).__name__
