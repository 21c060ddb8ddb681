"""Built-in corpora: each module exposes `documents() -> list[Document]` (see corpus.py)."""
