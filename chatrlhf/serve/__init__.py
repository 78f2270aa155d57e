"""Using a trained model: `chatrlhf chat` (a conversation in the terminal) and `chatrlhf serve` (an
OpenAI-compatible HTTP server). Both generate through the one generation interface (engine/generation.py), with
either backend."""
