"""Write an SVG screenshot of the dashboard showing the demo node (offline, no node needed).

    .venv/bin/python scripts/tui_screenshot.py [--out docs/tui.svg] [--size 120x40]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tui.app import FlNodeApp  # noqa: E402  (the repository root is on the path now)
from tui.demo import DemoSource  # noqa: E402


async def screenshot(out: Path, width: int, height: int) -> None:
    """Play the demo story into the app, headless, and save what the screen shows."""
    source = DemoSource()
    app = FlNodeApp(source)
    async with app.run_test(size=(width, height)) as pilot:
        await source.played.wait()
        await pilot.pause()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(app.export_screenshot(title="fl-node dashboard (python -m tui --demo)"))


def main() -> int:
    """Parse the arguments and write the screenshot."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/tui.svg"))
    parser.add_argument("--size", default="120x40", help="terminal COLUMNSxROWS")
    args = parser.parse_args()
    width, height = (int(x) for x in args.size.split("x"))
    asyncio.run(screenshot(args.out, width, height))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
