"""`simclr-embed train` and `simclr-embed eval`.

Every TrainConfig field is an option generated from the pydantic model (`--batch-size`,
`--augment.crop-min-scale`, booleans as `--compile/--no-compile`), so the CLI never drifts from
the schema the API and the worker use. `--config FILE` (JSON or YAML) gives a base that the
options override.

Under torchrun every process runs `train`; the engine joins torchrun's group, rank 0 alone
prints the result, and a group that torchrun restarts after a failure resumes from the last
checkpoint instead of refusing the run directory it left behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from service.contract.train_config import TrainConfig

_PREFIX = "cfg:"  # argparse dest of generated options: "cfg:" + dotted field path


def _option_kwargs(annotation: Any, metavar: str) -> dict[str, Any]:
    """argparse keyword arguments for a (possibly optional) scalar or Literal annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = args[0]  # X | None: the option takes an X
        args = list(typing.get_args(annotation))
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": args, "type": type(args[0])}
    return {"type": annotation, "metavar": metavar}


def _add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel], prefix: str = "") -> None:
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            _add_model_options(parser, field.annotation, f"{prefix}{name}.")
            continue
        default = "derived" if field.default is None else field.default
        help_ = f"{field.description + '; ' if field.description else ''}default: {default}".replace("%", "%%")
        parser.add_argument(
            f"--{prefix}{name.replace('_', '-')}",
            dest=f"{_PREFIX}{prefix}{name}",
            default=argparse.SUPPRESS,
            help=help_,
            **_option_kwargs(field.annotation, name.upper()),
        )


def _read_config_file(path: Path) -> dict[str, Any]:
    text = path.read_text()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    if isinstance(data, dict) and isinstance(data.get("config"), dict):
        data = data["config"]  # a run's config.json
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of TrainConfig fields")
    return data


def build_config(args: argparse.Namespace) -> TrainConfig:
    """The config file (if any) with the options given on the command line applied over it."""
    values: dict[str, Any] = _read_config_file(args.config) if args.config else {}
    for dest, value in vars(args).items():
        if dest.startswith(_PREFIX):
            *parents, leaf = dest[len(_PREFIX) :].split(".")
            node = values
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return TrainConfig.model_validate(values)  # the engine decides the defaults left open, for the run


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"simclr-embed {command}")
    if command == "train":
        parser.add_argument("--data", required=True, help="folder of images or .npz (uint8 NHWC)")
        parser.add_argument("--out", required=True, type=Path, help="run directory")
        parser.add_argument("--config", type=Path, help="JSON or YAML file of TrainConfig fields")
        parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
        _add_model_options(parser, TrainConfig)
    else:
        parser.add_argument("--run", required=True, type=Path, help="run directory with checkpoints/last.pt")
        parser.add_argument(
            "--data", required=True, help="labeled .npz (x_/y_train, x_/y_test) or folder with train/ and test/"
        )
        parser.add_argument("--batch-size", type=int, default=256)
        parser.add_argument("--device", default=None, help="torch device; default: cuda if available")
        parser.add_argument("--k", type=int, default=200, help="neighbours of the kNN classifier")
    return parser


def _train(args: argparse.Namespace) -> dict[str, Any] | None:
    """The run's result, or None on a torchrun rank other than 0 (rank 0 reports it)."""
    from dataclasses import asdict

    from trainer.checkpoint import checkpoint_path
    from trainer.distributed import torchrun_launch
    from trainer.engine import train

    cfg = build_config(args)
    launch = torchrun_launch()
    resume = args.resume or (launch is not None and launch.restart > 0)
    if checkpoint_path(args.out).exists() and not resume:
        raise ValueError(f"{args.out} already holds a run; pass --resume to continue it or choose another --out")
    result = train(cfg, args.data, args.out, resume=resume)
    return asdict(result) if launch is None or launch.rank == 0 else None


def _eval(args: argparse.Namespace) -> dict[str, Any]:
    from trainer.checkpoint import load_encoder
    from trainer.evaluate import evaluate_encoder

    encoder, cfg, info = load_encoder(args.run)
    metrics = evaluate_encoder(
        encoder, args.data, cfg.image_size, batch_size=args.batch_size, device=args.device, k=args.k
    )
    return {"run": str(args.run), "step": info["step"], **metrics}


def main(argv: list[str] | None = None) -> int:
    """argv[0] is the subcommand ("train" or "eval"), as service.cli passes it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("train", "eval"):
        print("usage: simclr-embed {train,eval} [options]", file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    args = _parser(command).parse_args(rest)
    try:
        result = _train(args) if command == "train" else _eval(args)
    except (ValidationError, ValueError, FileNotFoundError) as exc:  # DatasetError is a ValueError
        print(f"simclr-embed {command}: error: {exc}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
