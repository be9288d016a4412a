"""Caption operators: language id, caption quality filter, sentence embeddings."""
