"""Evaluation: held-out perplexity and bits-per-byte with controls, degeneration, metrics."""
