"""simclr-embed serving side: FastAPI + ONNX Runtime + FAISS. Never imports torch."""

__version__ = "0.1.0"
