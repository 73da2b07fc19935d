"""Shared vocabulary and the engine: model store, tokenizer, segment engine, sampling, generation.

Knows nothing of sockets; `transport`, `device` and `cloud` build on it.
"""
