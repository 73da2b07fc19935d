"""edgesplit.cloud (built by later issues)."""
