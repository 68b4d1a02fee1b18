"""Model configuration: the ml_collections defaults and their validated, frozen form.

``model_config()`` lists every model key with a one-line comment; experiment files in
``configs/`` start from it and override. ``ModelSpec.from_config`` checks every field
*before* anything is traced and raises ValueError naming the field, the value and what
would be valid.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import ml_collections
from ml_collections import config_dict

from xlps import sharing as sharing_lib

FAMILIES = ("decoder_lm", "encoder_mlm", "encoder_decoder")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "swiglu")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
POSITIONS = ("learned", "sinusoidal", "none")
DTYPES = ("float32", "bfloat16")
# Zero-argument policies of jax.checkpoint_policies usable as remat policies; "none"
# disables remat, "full" rematerialises everything (nn.remat without a policy).
REMAT_POLICIES = ("none", "full", "nothing_saveable", "everything_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable")


def sharing_config(num_unique: int = 1, order: str = "cycle") -> ml_collections.ConfigDict:
  """Default plan plus per-component overrides (None = inherit the default)."""
  s = ml_collections.ConfigDict()
  s.num_unique = num_unique    # M: unique parameter sets per component (1 = fully tied)
  s.order = order              # sequence | cycle | cycle_rev | table
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
  m.family = "decoder_lm"          # decoder_lm | encoder_mlm | encoder_decoder
  m.vocab_size = 256               # byte-level by default
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
  m.max_len = 512                  # positions available (learned) and FLOP accounting length
  m.type_vocab_size = 0            # segment embeddings (BERT / ALBERT: 2); 0 = none
  m.use_bias = True                # biases in dense layers
  m.tie_embeddings = True          # output projection = input embedding (transposed)
  m.tie_encoder_decoder = False    # decoder reuses the encoder's self-attention and FFN
  m.pooler = False                 # BERT/ALBERT pooler (dense+tanh on the first token)
  m.dropout_rate = 0.0             # residual / embedding dropout
  m.attention_dropout_rate = 0.0   # dropout on attention probabilities
  m.init_std = 0.02                # kernel / embedding init: N(0, init_std) cut at +-2 init_std
  m.dtype = "float32"              # compute dtype: float32 | bfloat16 (params stay float32)
  m.scan_layers = True             # one nn.scan over applied depth; False = unrolled reference
  m.remat_policy = "none"          # none | full | a jax.checkpoint_policies name
  m.sharing = sharing_config()
  return m


def parse_arg(arg: str | None, **defaults):
  """big_vision-style ``get_config`` argument: ``"base"`` or ``"variant=base,runlocal"``.

  A bare word sets the first default key (or a bool default to True); ``key=value`` pairs
  are converted to the default's type. Unknown keys raise ValueError.
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
      raise ValueError(f"config argument {key!r} is unknown; valid: {', '.join(defaults)}")
    kind = type(defaults[key])
    result[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
  return ml_collections.ConfigDict(result)


def _check_choice(field: str, value, valid: tuple) -> None:
  if value not in valid:
    raise ValueError(f"{field}={value!r} is not valid; choose one of: {', '.join(map(str, valid))}")


def _check_int(field: str, value, minimum: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f"{field}={value!r} must be an integer >= {minimum}")


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
  max_len: int
  type_vocab_size: int
  use_bias: bool
  tie_embeddings: bool
  tie_encoder_decoder: bool
  pooler: bool
  dropout_rate: float
  attention_dropout_rate: float
  init_std: float
  dtype: str
  scan_layers: bool
  remat_policy: str
  # Per stack ("encoder" / "decoder") and component: the sharing plan.
  plans: tuple[tuple[str, tuple[tuple[str, sharing_lib.Plan], ...]], ...]

  def stack_plans(self, stack: str) -> dict[str, sharing_lib.Plan]:
    return dict(dict(self.plans)[stack])

  @property
  def stacks(self) -> tuple[str, ...]:
    return tuple(name for name, _ in self.plans)

  @classmethod
  def from_config(cls, m: Mapping, field: str = "model") -> "ModelSpec":
    """Validates ``config.model`` and resolves defaults (0 = derived)."""
    f = lambda k: f"{field}.{k}"  # noqa: E731
    check_known_keys(m, field)
    _check_choice(f("family"), m["family"], FAMILIES)
    for key, lo in (("vocab_size", 2), ("d_model", 1), ("num_heads", 1), ("d_ff", 1),
                    ("num_layers", 1), ("max_len", 1), ("embed_dim", 0), ("num_kv_heads", 0),
                    ("num_decoder_layers", 0), ("type_vocab_size", 0)):
      _check_int(f(key), m[key], lo)
    d, h = m["d_model"], m["num_heads"]
    if d % h:
      valid = [x for x in range(1, d + 1) if d % x == 0 and x <= 128]
      raise ValueError(f"{f('num_heads')}={h} does not divide {f('d_model')}={d}; "
                       f"valid num_heads: {valid}")
    kv = m["num_kv_heads"] or h
    if h % kv:
      valid = [x for x in range(1, h + 1) if h % x == 0]
      raise ValueError(f"{f('num_kv_heads')}={kv} does not divide {f('num_heads')}={h}; "
                       f"valid num_kv_heads: {valid} (1 = multi-query, {h} = multi-head)")
    embed_dim = m["embed_dim"] or d
    if embed_dim > d:
      raise ValueError(f"{f('embed_dim')}={embed_dim} exceeds {f('d_model')}={d}; the factorized "
                       "embedding needs embed_dim <= d_model (0 = d_model)")
    _check_choice(f("activation"), m["activation"], ACTIVATIONS)
    _check_choice(f("norm"), m["norm"], NORMS)
    _check_choice(f("norm_position"), m["norm_position"], NORM_POSITIONS)
    _check_choice(f("position_embedding"), m["position_embedding"], POSITIONS)
    _check_choice(f("dtype"), m["dtype"], DTYPES)
    _check_choice(f("remat_policy"), m["remat_policy"], REMAT_POLICIES)
    for key in ("dropout_rate", "attention_dropout_rate"):
      if not 0.0 <= float(m[key]) < 1.0:
        raise ValueError(f"{f(key)}={m[key]!r} must be in [0, 1)")
    if m["tie_encoder_decoder"] and m["family"] != "encoder_decoder":
      raise ValueError(f"{f('tie_encoder_decoder')}=True needs {f('family')}='encoder_decoder' "
                       f"(family is {m['family']!r})")

    n_dec = m["num_decoder_layers"] or m["num_layers"]
    sharing_field = f("sharing")
    if m["family"] == "decoder_lm":
      stacks = {"decoder": sharing_lib.component_plans(
          m["sharing"], m["num_layers"], ("attention", "mlp", "norms"), sharing_field)}
    elif m["family"] == "encoder_mlm":
      stacks = {"encoder": sharing_lib.component_plans(
          m["sharing"], m["num_layers"], ("attention", "mlp", "norms"), sharing_field)}
    else:
      enc = sharing_lib.component_plans(m["sharing"], m["num_layers"],
                                        ("attention", "mlp", "norms"), sharing_field)
      dec = sharing_lib.component_plans(m["sharing"], n_dec,
                                        ("attention", "mlp", "norms", "cross_attention"),
                                        sharing_field)
      stacks = {"encoder": enc, "decoder": dec}
    plans = tuple((name, tuple(p.items())) for name, p in stacks.items())
    return cls(
        family=m["family"], vocab_size=m["vocab_size"], d_model=d, embed_dim=embed_dim,
        num_heads=h, num_kv_heads=kv, head_dim=d // h, d_ff=m["d_ff"],
        num_layers=m["num_layers"], num_decoder_layers=n_dec, activation=m["activation"],
        norm=m["norm"], norm_eps=float(m["norm_eps"]), norm_position=m["norm_position"],
        embed_norm=bool(m["embed_norm"]), position_embedding=m["position_embedding"],
        max_len=m["max_len"], type_vocab_size=m["type_vocab_size"], use_bias=bool(m["use_bias"]),
        tie_embeddings=bool(m["tie_embeddings"]),
        tie_encoder_decoder=bool(m["tie_encoder_decoder"]), pooler=bool(m["pooler"]),
        dropout_rate=float(m["dropout_rate"]),
        attention_dropout_rate=float(m["attention_dropout_rate"]),
        init_std=float(m["init_std"]), dtype=m["dtype"], scan_layers=bool(m["scan_layers"]),
        remat_policy=m["remat_policy"], plans=plans)


def check_known_keys(m: Mapping, field: str = "model") -> None:
  """Rejects keys that ``model_config()`` does not define (typos in experiment files)."""
  known = model_config()
  for key in m:
    if key not in known:
      raise ValueError(f"{field}.{key} is not a model key; valid keys: {', '.join(sorted(known))}")
