"""``fastalign <command>``: the command-line entry point."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastalign", description=__doc__.split(":")[1].strip())
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.add_parser("env", help="print versions and which implementations are available here")
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    if args.command == "env":
        from fastalign.env import main as env_main

        return env_main(rest)
    parser.print_help()
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
