"""Few-label classifiers on frozen embeddings: numpy fits, durable storage, the service."""
