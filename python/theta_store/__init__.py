"""theta-store: version ML model checkpoints in ordinary Git."""
