"""The retrieval database: token streams, chunk store, retrievers, neighbours, manifest."""
