"""Render a run report (report.html, see transforms/report.py) in headless Chromium to a PNG screenshot.

    .venv/bin/python scripts/render_report.py out/sample/output/notes/report.html --out notes.png [--trim]

It runs ``chromium --headless --disable-gpu --no-sandbox --screenshot=OUT.png --window-size=W,H
file://REPORT`` in a throw-away profile. The page loads nothing from the network, so this also
shows that the report is self-contained. Local files only: copy an s3:// or gs:// report down first.

Chromium is not a Python package. On Debian or Ubuntu install it with

    sudo apt-get update && sudo apt-get install -y chromium     # Ubuntu: chromium-browser (a snap)

or point ``--chromium`` (or the CHROMIUM environment variable) at any Chromium or Chrome binary.
Without one the script stops with exit status 2 and says so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class ChromiumMissing(RuntimeError):
    pass


def find_chromium(explicit: str | None = None) -> str:
    """The Chromium binary to use: ``explicit``, else $CHROMIUM, else the first of CANDIDATES on PATH."""
    for name in ([explicit] if explicit else []) + ([os.environ["CHROMIUM"]] if os.environ.get("CHROMIUM") else []) + list(CANDIDATES):
        found = shutil.which(name)
        if found:
            return found
        if explicit:
            raise ChromiumMissing(f"--chromium {explicit}: not an executable")
    raise ChromiumMissing(
        f"no Chromium found on PATH (looked for {', '.join(CANDIDATES)}); install it with "
        "`sudo apt-get install -y chromium` (Debian/Ubuntu) or pass --chromium /path/to/chrome"
    )


def trim_bottom(png: Path, margin: int = 24) -> None:
    """Cut the empty band below the page's content (the window is taller than most reports)."""
    from PIL import Image, ImageChops

    with Image.open(png) as im:
        rgb = im.convert("RGB")
    background = Image.new("RGB", rgb.size, rgb.getpixel((rgb.width - 1, rgb.height - 1)))
    box = ImageChops.difference(rgb, background).getbbox()
    if box and box[3] + margin < rgb.height:
        rgb.crop((0, 0, rgb.width, box[3] + margin)).save(png, optimize=True)


def render(report: Path, out: Path, width: int = 1200, height: int = 3000, chromium: str | None = None,
           timeout: float = 120, trim: bool = False) -> Path:
    """Screenshot ``report`` into ``out``; raises ChromiumMissing or RuntimeError with the reason."""
    report = Path(report).resolve()
    if not report.is_file():
        raise FileNotFoundError(f"{report}: no such report")
    binary = find_chromium(chromium)
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(prefix="render_report_") as profile:
        cmd = [binary, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--no-first-run",
               f"--user-data-dir={profile}", f"--screenshot={out}", f"--window-size={width},{height}", report.as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
        tail = "\n".join((proc.stderr or "").strip().splitlines()[-5:])
        raise RuntimeError(f"chromium exited with status {proc.returncode} and wrote no screenshot:\n{tail}")
    if trim:
        trim_bottom(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path, help="a local report.html")
    parser.add_argument("--out", type=Path, help="PNG to write (default: the report's path with .png)")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=3000, help="window height: the screenshot's height before --trim")
    parser.add_argument("--chromium", help="Chromium or Chrome binary (default: $CHROMIUM, then PATH)")
    parser.add_argument("--trim", action="store_true", help="cut the empty band below the content")
    args = parser.parse_args(argv)
    try:
        out = render(args.report, args.out or args.report.with_suffix(".png"), args.width, args.height,
                     args.chromium, trim=args.trim)
    except ChromiumMissing as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, RuntimeError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
