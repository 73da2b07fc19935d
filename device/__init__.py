"""edgesplit.device: the device side of a split run.

- `remote`: the split client. `RemoteSegment` is the cloud's back segment as the generation loop's
  `SamplingSegment` (it returns sampled token ids); `load_front` loads the device segment
  `[0, cut)` as the plan says; `run_split` streams `SplitResponse`s over a ZeroMQ channel.
- `timings`: where a split token's time and bytes go (`SplitTimings`) and a run's summary.
- `flash/`: flash windowing at run time (the flash store, embedding rows, layer streaming, neuron
  windowing).
- `planning/`: pure cost models, the fidelity table and the joint planner; never imports the
  split client.
- `profiling/`: measuring this machine into a device profile.

Imports `runtime`, `profiles` and `transport`, never `cloud`; the harnesses that start a cloud
worker live in the application layer (`edgesplit.harness`).
"""
