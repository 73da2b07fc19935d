"""edgesplit.runtime: the shared vocabulary and the engine.

The model store (`store`, `models`: a GGUF converted into per-layer shards), the tokenizer, the
segment engine on onnxruntime (`graph`, `engine`, `kv_cache`), the plan (`plan`: one frozen value,
its defaults and construction), activation codecs (`codec`, pure functions), sampling, the
generation loop (`generate`: the Segment protocols, three levels, the stop rule), evaluation
against the numpy reference, memory figures (`memory`: MB = 10^6 bytes) and errors.

Knows nothing of sockets and imports nothing above it; `transport`, `device` and `cloud` build on it.
"""
