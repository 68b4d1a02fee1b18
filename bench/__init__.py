"""Benchmarks, each run as ``python -m bench.NAME`` (absl flags, ``bench.harness``); a package
so that the scripts and tests share their setup (``bench.sharded_run``, ``bench.workloads``)."""
