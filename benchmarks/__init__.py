"""Benchmark and report tooling of the repository (needs a checkout; not part of the shipped
``kernels`` / ``c2f_fast`` packages): ``python -m benchmarks.kernel_report`` writes KERNELS.md."""
