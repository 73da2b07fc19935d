"""edgesplit.device (built by later issues)."""
