"""Evaluation: side-by-side policy comparison with a reward model and an optional programmatic judge."""
