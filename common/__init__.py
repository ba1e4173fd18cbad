"""Pieces every package shares and that import nothing of ours: validation, atomic writes, config, metric sinks."""
