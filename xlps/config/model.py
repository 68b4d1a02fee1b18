"""The model section: every model key with its default, and ``ModelSpec``.

``ModelSpec.from_config`` validates ``config.model`` (its depth sub-sections through
``xlps.config.depth``) and resolves each stack's sharing plan; the frozen, hashable result is
what Flax modules receive. Also the remat helpers and ``check_devices`` (what this machine
must have for a spec to run here).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping

import ml_collections

from xlps import families as families_lib
from xlps import sharing as sharing_lib
from xlps.config.checks import (ConfigError, check_bool, check_choice, check_int, check_keys,
                                check_number, unknown_key)
from xlps.config.depth import (ActSpec, LoopSpec, LoraSpec, RecursionSpec, RoutingSpec,
                               act_config, recursion_config,
                               kv_sharing_config, loop_config, lora_config, routing_config,
                               sharing_config)


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
  m.recursion = recursion_config()
  return m


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
  recursion: "RecursionSpec | None"  # latent recursion with deep supervision (puzzle family)
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
    recursion = RecursionSpec.from_config(m, f("recursion"))
    if recursion is not None and (loop is not None or m["act"]["enabled"]):
      raise ConfigError(f"{f('recursion.net_layers')}={recursion.net_layers} and "
                        f"{f('loop.core' if loop else 'act.enabled')}: latent recursion chooses "
                        "the depth itself; leave model.loop and model.act off")
    plan_sharing = (loop.sharing() if loop is not None else
                    recursion.sharing() if recursion is not None else m["sharing"])
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
        lora=lora, routing=routing, recursion=recursion, stacks=stacks)


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


def check_remat_group(size: int, scan_layers: bool, stacks: Iterable[sharing_lib.StackPlan],
                      field: str) -> None:
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
  check_keys(m, field, sorted(model_config()), "model")
  sections = (Mapping, ml_collections.ConfigDict)
  sharing = m.get("sharing")
  if isinstance(sharing, sections):  # xlps.sharing names bad keys too; here with a suggestion
    plan_keys = ("num_unique", "order", "table")
    for key in sharing:
      if key not in plan_keys and key not in sharing_lib.COMPONENTS:
        raise unknown_key(f"{field}.sharing", key, plan_keys + sharing_lib.COMPONENTS, "sharing",
                          f"{', '.join(plan_keys)} and components "
                          f"{', '.join(sharing_lib.COMPONENTS)}")
      if key in sharing_lib.COMPONENTS and isinstance(sharing[key], sections):
        check_keys(sharing[key], f"{field}.sharing.{key}", plan_keys, "sharing")
  for name, schema in (("kv_sharing", kv_sharing_config()), ("act", act_config()),
                       ("loop", loop_config()), ("lora", lora_config()),
                       ("routing", routing_config())):
    section = m.get(name)
    if isinstance(section, sections):
      check_keys(section, f"{field}.{name}", tuple(schema), name)
