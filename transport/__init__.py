"""edgesplit.transport (built by later issues)."""
