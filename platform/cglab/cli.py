"""`cglab` console script. Each area registers its own subcommands; imports stay lazy so `--help` is fast."""

from __future__ import annotations

import argparse
import importlib
import sys

from cglab.config import ConfigError

# area module -> it defines register(subparsers). Order is the order in --help.
AREAS = [
    "cglab.data.cli",
    "cglab.pretrain",
    "cglab.ablate",
    "cglab.track.cli",
    "cglab.report",
    "cglab.eval.cli",
    "cglab.plan",
    "cglab.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cglab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in AREAS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name == name:  # area not built yet
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `cglab train CONFIG --name x a.b=1`: dotted overrides may come after options too
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        rc = args.func(args)
    except ConfigError as err:
        print(f"cglab: {err}", file=sys.stderr)
        return 2
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
