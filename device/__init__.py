"""edgesplit.device: the device side of a split run.

- `remote`: `RemoteSegment` (the cloud's back segment as a segment of the generation loop; it
  returns sampled token ids), `run_split` (local front + remote back, streaming `SplitResponse`s
  with per-token `SplitTimings`), `make_plan`, `load_front`.
- `simulate`: `simulate()` starts a cloud worker process on loopback and runs the device here over
  an emulated network link, returning latency / bytes / breakdown figures as one dict.

Imports `runtime` and `transport`, never `cloud`. Profiler, planner and flash windowing come later.
"""
