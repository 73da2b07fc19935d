"""edgesplit.firmware_configs (built by later issues)."""
