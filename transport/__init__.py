"""edgesplit.transport: the device <-> cloud link.

- `protocol`: the versioned wire protocol (msgpack frames, validation, error codes; docs/protocol.md).
- `channel`: the device's end of the link (`Channel`, a ZeroMQ DEALER socket; `MemoryChannel`, the
  same interface with the peer in this process, for tests of split logic without sockets).
- `link`: network emulation from a network profile (serialization, latency, jitter, loss).

Builds on `runtime` and `profiles`; knows nothing of the device or the cloud.
"""
