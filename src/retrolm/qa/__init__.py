"""Question answering with and without retrieval: dataset I/O (`data`) and the modes (`pipeline`)."""
