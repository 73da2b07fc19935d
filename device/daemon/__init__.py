"""The device daemon: a long-running service with an OpenAI-compatible HTTP API on the device.

- `requests`: OpenAI request bodies parsed into typed, checked `ApiRequest`s (errors OpenAI-shaped).
- `service`: the front segment loaded once, the plan, the cloud link with failover, concurrency
  and the generation of one request as response records (stop strings included).
- `app`: the ASGI app (Starlette): the routes, Bearer auth, SSE streaming, Prometheus metrics.
"""
