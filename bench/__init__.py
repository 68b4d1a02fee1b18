"""Benchmarks; a package so that tests share their setup (``bench.sharded_run``)."""
