"""Items: the caller's indexed images and their vectors.

The SQLite store (`store.py`) and the content-addressed originals (`blobs.py`) are the
source of truth; the FAISS index per model (`index.py`) is derived from them, snapshotted for
fast start-up and rebuilt when missing or stale. `service.py` ties them to the encoder
runtime; `reindex.py` re-embeds every item when another model is activated.
"""
