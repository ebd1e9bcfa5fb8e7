"""Benchmarks for cpis-bridge (`make bench`): the baseline app, the harness and its wrk scripts."""
