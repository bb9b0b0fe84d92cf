"""Benchmarks and the GPU acceptance run, as modules run from the repository root: ``python -m
benchmarks.bench_serving`` (CPU), ``python -m benchmarks.gpu_bench``, ``python -m benchmarks.gpu_accept`` (see
benchmarks/README.md). Their daemons are started by ``edgephi.testing.run_daemon``, the tests' launcher."""
