"""edgesplit: run an LLM split between a small device and a cloud worker.

This package is the application layer: the CLI (`cli`, `cli_split`, `cli_plan`) and the harnesses
that compose device and cloud (`harness`: simulate, loadtest, sweep, worker processes, benchmarks,
evaluation drivers). The library lives in the sub-packages mapped from the top-level folders:
`edgesplit.runtime`, `.transport`, `.device`, `.cloud`, `.profiles`, `.firmware_configs`.
"""

__version__ = "0.1.0"
