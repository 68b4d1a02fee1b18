"""Test setup: 8 fake CPU devices (set before jax is imported) and float32 matmuls."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per test run, shared by the xdist workers and the
# launch.* subprocesses they start (which inherit the environment): many tests compile the
# same small programs, and a cached executable loads in a fraction of the compile time.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), "xlps-test-jax-cache-"
    + os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """One TFDS data_dir shared by all xdist workers of a run (preparation is atomic)."""
  path = tmp_path_factory.getbasetemp().parent / "tfds"
  path.mkdir(exist_ok=True)
  return path


# Cases of fast-tier tests that run in the slow tier instead (measured at 13-50 s each on 2
# cores, 2026-12-08; each kind keeps a faster case in the fast tier, except the loop's
# truncation, whose detach the recursion tests' no-grad prefix also checks): the README's
# test command stays under 15 minutes.
SLOW_CASES = frozenset({
    "tests/test_loop.py::test_truncation_detaches_exactly_the_first_r_minus_k_iterations[none]",
    "tests/test_train.py::test_each_family_learns[encoder_mlm]",
    "tests/test_train.py::test_resume_is_exact",
    "tests/test_train.py::test_useful_tokens_are_the_non_pad_positions[encoder_mlm]",
    "tests/test_generate.py::test_trained_with_kv_sharing_decodes_equal_to_itself[cross_layer]",
    "tests/test_generate.py::test_seq2seq_cached_decoding_equals_full_recomputation[tied_m2_gqa]",
    "tests/test_routing.py::test_routed_out_positions_stop_changing[token_choice]",
    "tests/test_partitioning.py::test_sharded_equals_single_device[unshared-d2f2t2]",
    "tests/test_partitioning.py::test_sharded_equals_single_device[unshared-fsdp8]",
    "tests/test_lora.py::test_each_applied_layer_uses_its_own_adapter[value,wo-False]",
    "tests/test_lora.py::test_gradients_reach_every_layers_adapter",
    "tests/test_recursify.py::test_zero_lora_init_keeps_the_tied_model",
    "tests/test_data.py::test_global_batch_depends_on_num_shards_not_on_process_count[encoder_mlm]",
    "tests/test_engine.py::test_explicit_table_sandwich",
})


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
  """Marks ``SLOW_CASES`` slow before ``-m`` selects (a missing id is an error, so the list
  cannot silently go stale)."""
  ids = {item.nodeid for item in items}
  full_run = all(not arg.startswith("tests/test_") or "::" not in arg for arg in config.args)
  missing = SLOW_CASES - ids
  if missing and full_run and len({i.split("::")[0] for i in ids}) > 20:
    raise pytest.UsageError(f"tests/conftest.py SLOW_CASES names tests that do not exist: "
                            f"{sorted(missing)}")
  for item in items:
    if item.nodeid in SLOW_CASES:
      item.add_marker(pytest.mark.slow)
