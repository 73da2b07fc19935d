"""edgesplit.profiles (built by later issues)."""
