"""One driver per stage: sft, reward, rl, pipeline. Each reads top to bottom."""
