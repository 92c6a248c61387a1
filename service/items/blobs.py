"""Originals, content-addressed: `<root>/ab/abcdef...` named by the sha256 of their bytes.

Kept so a newly activated model can re-embed every item and a page can show results.
A blob is written to a temporary file, fsynced and renamed into place (then the directory
fsynced) before the store commits the row that points at it, so a committed item always
has its original; identical images are stored once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from service.contract.atomic import write_atomic


class BlobStore:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def digest(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes) -> str:
        """Store `data` durably (no-op when already present); returns its sha256."""
        sha = self.digest(data)
        final = self.path(sha)
        if final.is_file() and final.stat().st_size == len(data):
            return sha
        write_atomic(final, data)
        return sha

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def get(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)
