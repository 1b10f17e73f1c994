"""GPU benchmarks of snlp_compile, run from a source checkout: ``python -m benchmarks --help``."""
