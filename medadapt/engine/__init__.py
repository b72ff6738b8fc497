"""Training and inference plumbing that the bundles wire together (handlers, data preparation,
prediction writers, distributed helpers)."""
