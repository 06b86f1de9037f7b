"""Command-line options made from a config dataclass, so each default is written once.

Where it sits: beside `cli.py`. `minimind-v train` calls `add_config_options(parser, TrainConfig)`:
every field becomes `--field-name` with the field's type, choices and help (from its metadata),
and `config_from_args` builds the dataclass from the options that were given.
"""
from __future__ import annotations

import argparse
import dataclasses


def add_config_options(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One `--name` option per field of the dataclass `cls`, with its type, choices and help.

    The defaults live only in the dataclass: an option left out is None and keeps the field's default.
    """
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        flag, help_ = "--" + f.name.replace("_", "-"), f.metadata.get("help", "")
        kind = str(f.type)
        if kind == "bool" and f.default:
            parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                default=None, help="do not " + help_)
        elif kind == "bool":
            parser.add_argument(flag, action="store_true", default=None, help=help_)
            parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                help=argparse.SUPPRESS)        # turns off what a recipe switched on
        elif kind.startswith("tuple"):
            parser.add_argument(flag, type=lambda s: tuple(x.strip() for x in s.split(",") if x.strip()),
                                help=help_)
        else:
            conv = int if kind.startswith("int") else float if kind.startswith("float") else str
            parser.add_argument(flag, type=conv, choices=f.metadata.get("choices"), help=help_)


def config_from_args(args: argparse.Namespace, cls):
    """The dataclass built from the options that were given (the others keep their defaults)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
             if getattr(args, f.name, None) is not None}
    return cls(**given)
