"""`simclr-embed`: one console script; each subcommand lives with the code it drives.

Serving subcommands never import torch; `train`, `eval` and `export` load the trainer.
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with a `main(argv) -> int`, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("service.up", "run the whole stack on this machine (embedded broker, worker, API)"),
    "serve": ("service.server", "run the API alone: serve --host H --port P"),
    "worker": ("trainer.worker", "run a Celery worker for training and re-indexing jobs"),
    "train": ("trainer.cli", "pretrain an encoder: train --data PATH --out RUN_DIR"),
    "eval": ("trainer.cli", "kNN and linear-probe top-1 of a run's encoder on a labeled split"),
    "export": ("trainer.export", "export a run's encoder to ONNX and publish it: export RUN_DIR --registry DIR"),
    "index": ("service.items.cli", "index a folder or .npz into the item store: index DATASET [--folders-as FIELD]"),
    "backup": ("service.items.backup", "a consistent copy of the SQLite item store and the originals: backup DEST"),
    "jobs": ("service.jobs.cli", "submit, list, show and cancel training jobs through the API"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "usage: simclr-embed COMMAND [options]\n\ncommands:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"simclr-embed: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    # trainer.cli serves several subcommands, so it gets the subcommand name too.
    return int(module.main([command, *rest]) if module.__name__ == "trainer.cli" else module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
