"""edgesplit: run an LLM split between a small device and a cloud worker."""

__version__ = "0.1.0"
