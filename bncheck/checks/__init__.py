"""Rules: the catalogue (metadata), the registry, and the check functions."""
