"""chatrlhf: the InstructGPT recipe (SFT, reward model, PPO) as one package and CLI."""

__version__ = "0.1.0"
