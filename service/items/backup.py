"""`simclr-embed backup DEST`: a consistent copy of the embedded (SQLite) item store while the
service runs, for a restore into a new data dir.

A live SQLite file in WAL mode cannot be copied as a file: the copy may hold half of a
checkpoint, or miss commits still in the -wal file. sqlite3's online backup API copies the
database page by page from one read snapshot and restarts when a writer changes a page it
already copied, so the result is one committed state. The item store (classifiers
included: their tables are in items.sqlite3) is copied first, then the originals (`blobs/`,
content-addressed: files already in DEST are kept): an original is written before the row
that names it commits, so the later copy holds the original of every copied row.

Restore: stop the service, put DEST's `items.sqlite3` and `blobs/` in `<data dir>/items/`;
the FAISS indexes are rebuilt from the store at start.
A PostgreSQL store is backed up with pg_dump (deploy/README.md); this command refuses it.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
from pathlib import Path

from service.contract.atomic import fsync_dir
from service.settings import Settings


def backup_sqlite(source: Path, target: Path) -> None:
    """Copy the database at `source` to `target` (replaced atomically) through the backup API."""
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True, timeout=30.0)
    dst = sqlite3.connect(partial)
    try:
        src.backup(dst, pages=1024)
        dst.execute("PRAGMA journal_mode=DELETE")  # a self-contained file, no -wal beside it
    finally:
        dst.close()
        src.close()
    partial.replace(target)
    fsync_dir(target.parent)


def copy_blobs(source: Path, target: Path) -> int:
    """Copy originals missing from `target`; returns how many were copied."""
    copied = 0
    for path in sorted(source.glob("*/*")):
        dest = target / path.parent.name / path.name
        if path.is_file() and not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest.with_name(dest.name + ".partial"))
            dest.with_name(dest.name + ".partial").replace(dest)
            copied += 1
    return copied


def backup(settings: Settings, dest: Path) -> dict[str, int]:
    """Back up the SQLite item store (classifiers included) and the originals into `dest`."""
    if settings.uses_postgres:
        raise ValueError("the item store is on PostgreSQL: back it up with pg_dump (see deploy/README.md)")
    store = settings.sqlite_store_path
    if not store.is_file():
        raise ValueError(f"no item store at {store}")
    dest.mkdir(parents=True, exist_ok=True)
    backup_sqlite(store, dest / "items.sqlite3")
    return {"originals_copied": copy_blobs(settings.items_dir / "blobs", dest / "blobs")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="simclr-embed backup", description=__doc__.split("\n\n")[0])
    ap.add_argument("dest", type=Path, help="folder for items.sqlite3 and blobs/")
    args = ap.parse_args(argv)
    try:
        report = backup(Settings(), args.dest)
    except (ValueError, sqlite3.Error, OSError) as exc:
        print(f"simclr-embed backup: {exc}", file=sys.stderr)
        return 2
    print(f"backed up to {args.dest}: {report['originals_copied']} original(s) copied")
    return 0
