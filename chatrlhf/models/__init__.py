"""Models: loading (a Hugging Face directory or a tiny preset), tokenizers, value-head models."""
