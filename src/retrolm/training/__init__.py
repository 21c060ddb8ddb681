"""Pieces of the trainer, one job per module; `retrolm.training.trainer` puts them together.

- `schedule`: learning-rate schedule (warm-up, cosine decay to a floor, re-warm)
- `budget`: turns a --minutes budget into a step count
- `optimizer`: AdamW with parameter groups (no decay on norms, biases, embeddings)
- `distributed`: torchrun / DDP setup and collective helpers (the model never sees it)
- `checkpointing`: atomic trainer checkpoints, JSON-safe RNG state, resume lookup
- `monitor`: progress bar, metrics JSONL, TensorBoard (optional), loss-curve PNG
"""
