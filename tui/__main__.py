"""``python -m tui [URL] --token TOKEN | --token-file FILE | --demo``: the node dashboard."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .app import FlNodeApp, run_tui
from .demo import DemoSource


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the dashboard; return the exit code."""
    parser = argparse.ArgumentParser(prog="python -m tui", description=(
        "Terminal dashboard of a running fl-node. Keys: s start, x stop, p pairing code,"
        " q quit."))
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:7800",
                        help="the node's web API (default http://127.0.0.1:7800)")
    token = parser.add_mutually_exclusive_group(required=True)
    token.add_argument("--token", help="the node's API token")
    token.add_argument("--token-file", type=Path,
                       help="file holding the API token (the node's <state dir>/api.token)")
    token.add_argument("--demo", action="store_true",
                       help="show a made-up node instead of connecting to one")
    args = parser.parse_args(argv)
    if args.demo:
        app = FlNodeApp(DemoSource())
        app.run()
        return app.return_code or 0
    if args.token_file is not None:
        try:
            args.token = args.token_file.read_text().strip()
        except OSError as exc:
            print(f"python -m tui: cannot read the token: {exc}", file=sys.stderr)
            return 2
    return run_tui(args.url, args.token)


if __name__ == "__main__":
    sys.exit(main())
