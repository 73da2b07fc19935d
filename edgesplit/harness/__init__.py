"""Harnesses that compose device and cloud (simulate, loadtest, sweep, worker processes), benchmarks and evaluation drivers. Only the CLI imports them."""
