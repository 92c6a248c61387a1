"""`simclr-embed index DATASET`: index a folder of images or an .npz into the item store from a
shell (service.items.bulk), under the active model; an API serving the same data folder
picks the items up from the store's change log, with no restart."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from service.items.bulk import BulkIndexError, IndexReport, index_dataset
from service.settings import Settings


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="simclr-embed index", description=__doc__.split("\n\n")[0])
    ap.add_argument("dataset", type=Path, help="a folder tree of images, or an .npz (x_train / one uint8 array)")
    ap.add_argument("--folders-as", metavar="FIELD", help="store the first sub-folder's name as metadata FIELD")
    ap.add_argument("--metadata", type=Path, metavar="FILE", help="sidecar .jsonl or .csv keyed by `path`")
    ap.add_argument("--split", default="train", help=".npz split to index (x_<split>, y_<split>)")
    ap.add_argument(
        "--ids", choices=["path", "stem"], default="path", help="a folder image's id: relative path, or file stem"
    )
    ap.add_argument("--id-prefix", default="", metavar="TEXT", help="put TEXT before every id")
    ap.add_argument(
        "--delete-missing", action="store_true", help="delete items whose files vanished since the last run"
    )
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args(argv)

    def progress(report: IndexReport) -> None:
        done = f"{report.processed}/{report.total}"
        print(f"{done}: added {report.added}, replaced {report.replaced}, skipped {report.skipped}", file=sys.stderr)

    try:
        report = index_dataset(
            Settings(),
            args.dataset,
            folders_as=args.folders_as,
            sidecar=args.metadata,
            split=args.split,
            ids=args.ids,
            id_prefix=args.id_prefix,
            delete_missing=args.delete_missing,
            batch_size=args.batch_size,
            on_progress=progress,
        )
    except BulkIndexError as exc:
        print(f"simclr-embed index: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.__dict__))
    return 1 if report.failed else 0
