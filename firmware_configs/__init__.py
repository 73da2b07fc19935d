"""edgesplit.firmware_configs: per-board daemon settings (empty until the daemon is built).

The device daemon's typed, strict TOML configs (threads, memory budget, endpoints, keys, thermal
policy) and systemd unit templates will live here, loaded like the profiles.
"""
