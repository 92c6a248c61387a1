"""`simclr-embed jobs submit|list|show|cancel`: training jobs through the HTTP API.

The API address is `--api` or `SIMCLR_EMBED_API_URL` (default http://127.0.0.1:8000); a
write key, when the server wants one, is `--api-key` or `SIMCLR_EMBED_API_KEY`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx


def _parser() -> argparse.ArgumentParser:
    # --api/--api-key are accepted before or after the subcommand.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--api", default=argparse.SUPPRESS, help="API base URL")
    common.add_argument("--api-key", default=argparse.SUPPRESS, help="write key, when the server wants one")
    parser = argparse.ArgumentParser(prog="simclr-embed jobs", description=__doc__.split("\n\n")[0], parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    submit = sub.add_parser("submit", help="queue a pretraining job", parents=[common])
    submit.add_argument("dataset", help="folder or .npz under a dataset root of the server")
    submit.add_argument("--config", help="JSON file with TrainConfig fields")
    submit.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a TrainConfig field (value parsed as JSON when it can be), repeatable",
    )
    submit.add_argument("--name")
    submit.add_argument("--no-activate", action="store_true", help="publish without activating")
    listing = sub.add_parser("list", help="jobs, newest first", parents=[common])
    listing.add_argument("--offset", type=int, default=0)
    listing.add_argument("--limit", type=int, default=20)
    for name, help_ in (("show", "one job, with progress"), ("cancel", "cancel a job")):
        sub.add_parser(name, help=help_, parents=[common]).add_argument("job_id")
    return parser


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(Path(args.config).read_text()) if args.config else {}
    for item in args.set:
        field, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set wants FIELD=VALUE, not {item!r}")
        body[field] = _value(value)
    body["dataset"] = args.dataset
    if args.name:
        body["name"] = args.name
    if args.no_activate:
        body["activate"] = False
    return body


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.api = getattr(args, "api", None) or os.environ.get("SIMCLR_EMBED_API_URL", "http://127.0.0.1:8000")
    api_key = getattr(args, "api_key", None) or os.environ.get("SIMCLR_EMBED_API_KEY")
    headers = {"X-API-Key": api_key} if api_key else {}
    with httpx.Client(base_url=args.api, headers=headers, timeout=30) as http:
        try:
            if args.command == "submit":
                answer = http.post("/train-jobs", json=_body(args))
            elif args.command == "list":
                answer = http.get("/train-jobs", params={"offset": args.offset, "limit": args.limit})
            elif args.command == "show":
                answer = http.get(f"/train-jobs/{args.job_id}")
            else:
                answer = http.delete(f"/train-jobs/{args.job_id}")
        except httpx.TransportError as exc:
            print(f"simclr-embed jobs: cannot reach the API at {args.api}: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(answer.json(), indent=2))
    return 0 if answer.is_success else 1
