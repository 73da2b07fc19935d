"""edgesplit.cloud: the cloud worker.

- `worker`: `CloudWorker`, serving many device sessions: ownership, limits, every bad frame
  answered with an error frame; `handle_frame` answers one frame without the socket.
- `batcher`: the decode frames read together, stepped in one forward pass per engine.
- `engines`: the shared back-segment engines (keyed by the plan's `back_settings`), each with
  its KV slot pool (runtime/batch.py).
- `prefills`: long prompts a chunk at a time, between decode batches; `admission`: what an `open`
  may start (the plan, the limits).
- `listener`: the socket, plain or CurveZMQ with a running authenticator; `refusals`: rate-limited
  logging of refused frames; `session`: one device session's state; `serve`: the worker process.
- `pool`: N workers as Ray actors and the directory devices query (`edgesplit cloud pool`; the
  optional `[cluster]` extra, imported only by the CLI).

Imports `runtime` and `transport`, never `device`.
"""
