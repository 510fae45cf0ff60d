"""Small example models and data used by the README, the demo, tests and benchmarks."""
