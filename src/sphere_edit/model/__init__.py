"""Model access: the architecture table, forward hooks, loading models."""
