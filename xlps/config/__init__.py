"""The config schema: every section's keys and defaults, and one ``validate(config)``.

``base_config()`` is a full experiment config (``seed``, ``model``, ``data``, ``train``,
``mesh``), each section listing every key with a one-line comment; experiment files in
``configs/`` start from it and override. ``validate`` checks every section and every
cross-section constraint before any data is read or anything is traced, and raises
``ConfigError`` naming the field, the value and what would be valid. ``ModelSpec`` is the
validated, frozen model section that Flax modules receive.

This package is the public surface (``from xlps import config as config_lib``): it only
re-exports. Each section is a module of its own, and they import in one direction:
``checks`` (ConfigError and the field checks) is under all of them; ``depth`` (model.sharing,
kv_sharing, loop, act, lora, routing) under ``model``; ``model`` under ``train``; ``data`` and
``mesh`` need only ``checks``; ``experiment`` (base_config, saved configs, validate) imports
the sections; ``flags`` (``--config`` command-line input) imports ``experiment``.

Importing it is light (ml_collections and the pure-Python sharing plans and families):
config files import it without pulling in JAX, Flax, Orbax, grain, TFDS or ``xlps.data``.
"""

from xlps.config.checks import (ConfigError, check_bool, check_choice, check_int, check_keys,
                                check_number, check_str, did_you_mean, parse_arg, then_valid,
                                unknown_key)
from xlps.config.data import (BYTE_VOCAB_SIZE, DATA_NAMES, NUM_SPECIAL, TASKS, TOKENIZERS,
                              check_data, data_config, max_lengths, seq2seq_length)
from xlps.config.depth import (ACT_UPDATES, LOOP_DEPTHS, LOOP_INIT_STATES, LOOP_INJECTIONS,
                               LORA_TARGETS, RECURSION_GRADIENTS, RECURSION_HALTINGS,
                               ROUTING_GATINGS, ROUTINGS, ActSpec, LoopSpec, LoraSpec,
                               RecursionSpec, RoutingSpec, act_config, check_loop_kv,
                               kv_sharing_config, lora_config, lora_full_ranks, loop_config,
                               recursion_config, routing_config, sharing_config)
from xlps.config.experiment import (RENAMED_MODEL_KEYS, SAVED_BEFORE_DEFAULTS, base_config,
                                    from_saved, upgrade_saved_model, validate)
from xlps.config.flags import check_override, config_flag_error, parse_config_flags
from xlps.config.mesh import LOGICAL_AXES, MESH_AXES, check_mesh, mesh_config, mesh_shape
from xlps.config.model import (ACTIVATIONS, ATTENTION_IMPLS, DTYPES, NORM_POSITIONS, NORMS,
                               POSITIONS, REMAT_POLICIES, ModelSpec, check_devices,
                               check_known_keys, check_remat_group, model_config,
                               remat_group_size)
from xlps.config.train import (NONFINITE, ON_MISMATCH, check_train, eval_iterations,
                               train_config)

__all__ = [
    # checks
    "ConfigError", "check_bool", "check_choice", "check_int", "check_keys", "check_number",
    "check_str", "did_you_mean", "parse_arg", "then_valid", "unknown_key",
    # model
    "ACTIVATIONS", "ATTENTION_IMPLS", "DTYPES", "NORM_POSITIONS", "NORMS", "POSITIONS",
    "REMAT_POLICIES", "ModelSpec", "check_devices", "check_known_keys", "check_remat_group",
    "model_config", "remat_group_size",
    # depth
    "ACT_UPDATES", "LOOP_DEPTHS", "LOOP_INIT_STATES", "LOOP_INJECTIONS", "LORA_TARGETS",
    "RECURSION_GRADIENTS", "RECURSION_HALTINGS", "ROUTING_GATINGS", "ROUTINGS", "ActSpec",
    "LoopSpec", "LoraSpec", "RecursionSpec", "RoutingSpec",
    "act_config", "check_loop_kv", "kv_sharing_config", "lora_config", "lora_full_ranks",
    "loop_config", "recursion_config", "routing_config", "sharing_config",
    # data
    "BYTE_VOCAB_SIZE", "DATA_NAMES", "NUM_SPECIAL", "TASKS", "TOKENIZERS", "check_data",
    "data_config", "max_lengths", "seq2seq_length",
    # train
    "NONFINITE", "ON_MISMATCH", "check_train", "eval_iterations", "train_config",
    # mesh
    "LOGICAL_AXES", "MESH_AXES", "check_mesh", "mesh_config", "mesh_shape",
    # the whole config
    "RENAMED_MODEL_KEYS", "SAVED_BEFORE_DEFAULTS", "base_config", "from_saved",
    "upgrade_saved_model", "validate",
    # command-line input
    "check_override", "config_flag_error", "parse_config_flags",
]
