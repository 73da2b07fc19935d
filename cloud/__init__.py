"""edgesplit.cloud: the cloud worker.

- `worker`: `CloudWorker`, one ROUTER socket serving many device sessions on shared back-segment
  engines (keyed by the plan's `back_settings`), every limit and bad frame answered with an error
  frame; `handle_frame` answers one frame without the socket; `serve` runs it until a signal.
- `session`: one device session's state (its KV cache, sampler, sequence numbers).

Imports `runtime` and `transport`, never `device`.
"""
