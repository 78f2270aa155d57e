"""Training engines and the hybrid (train ↔ generate) actor engine."""
