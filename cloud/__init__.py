"""edgesplit.cloud: the cloud worker (worker.py: ROUTER socket, session routing, `serve`) and the
per-device session state (session.py). Imports runtime and transport, never device."""
