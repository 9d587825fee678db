"""corral: the client command line.

The daemon does not serve tasks yet (the actor system is pending), so every
subcommand says so plainly and exits 2 rather than pretending.
"""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="corral", description="corral client")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a command in a sandbox VM")
    run.add_argument("argv", nargs=argparse.REMAINDER)
    sub.add_parser("status", help="queue depth and pool states")
    args = parser.parse_args(argv)
    print(f"corral: not yet: `corral {args.command}` needs the actor system, which corrald "
          "does not have yet", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
