"""A real browser (headless Chromium) reads a listing and a page from the gateway.

The page's background is green, and a script in it would turn it red:
the screenshot must be green, which shows both that the page rendered
(type, bytes) and that the sandbox kept its script from running. Skipped
where Chromium is not installed (``scripts/test`` installs Debian's
package when it runs as root).
"""

from __future__ import annotations

import asyncio
import shutil
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from dht_dfs.gateway.http import bound_port, serve

from .cluster import cluster

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="headless Chromium is not installed")

PAGE = (
    b"<!doctype html><html><body style='background:#00ff00;margin:0'>"
    b"<script>document.body.style.background = '#ff0000'</script>"
    b"<h1 style='color:#00ff00'>green</h1></body></html>"
)


def pixels(png: bytes) -> tuple[int, int, list[tuple[int, int, int]]]:
    """(width, height, RGB of every pixel) of an 8-bit RGB or RGBA PNG."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    position, chunks, header = 8, [], b""
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        kind = png[position + 4 : position + 8]
        body = png[position + 8 : position + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            chunks.append(body)
        position += 12 + length
    width, height, depth, color = struct.unpack(">IIBB", header[:10])
    assert depth == 8 and color in (2, 6), "8-bit RGB or RGBA"
    step = 3 if color == 2 else 4
    raw = zlib.decompress(b"".join(chunks))
    stride = width * step
    rows: list[bytearray] = []
    previous = bytearray(stride)
    for y in range(height):
        kind, line = (
            raw[y * (stride + 1)],
            bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)]),
        )
        for x in range(stride):
            left = line[x - step] if x >= step else 0
            up = previous[x]
            corner = previous[x - step] if x >= step else 0
            if kind == 1:
                line[x] = (line[x] + left) & 0xFF
            elif kind == 2:
                line[x] = (line[x] + up) & 0xFF
            elif kind == 3:
                line[x] = (line[x] + (left + up) // 2) & 0xFF
            elif kind == 4:
                guess = left + up - corner
                near = min((abs(guess - left), 0, left), (abs(guess - up), 1, up),
                           (abs(guess - corner), 2, corner))  # fmt: skip
                line[x] = (line[x] + near[2]) & 0xFF
        rows.append(line)
        previous = line
    colors = [tuple(row[x : x + 3]) for row in rows for x in range(0, stride, step)]
    return width, height, colors  # type: ignore[return-value]


async def browse(*arguments: str) -> bytes:
    assert BROWSER is not None
    process = await asyncio.create_subprocess_exec(
        BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--hide-scrollbars", *arguments,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    output, _ = await asyncio.wait_for(process.communicate(), timeout=90)
    assert process.returncode == 0
    return output


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[str]:
    root = tmp_path / "site"
    (root / "pages").mkdir(parents=True)
    (root / "pages" / "green.html").write_bytes(PAGE)
    (root / "notes.txt").write_text("plain text\n")
    async with cluster(tmp_path / "net", 3) as net, net.client() as network:
        result = await network.publish(root)
        runner = await serve(network, "127.0.0.1", 0)
        try:
            yield f"http://127.0.0.1:{bound_port(runner)}/{result.reference}/"
        finally:
            await runner.cleanup()


async def test_a_browser_reads_a_listing_and_renders_a_page_without_its_script(
    site: str, tmp_path: Path
) -> None:
    dom = (await browse("--dump-dom", site)).decode()
    assert 'href="pages/"' in dom and 'href="notes.txt"' in dom
    shot = tmp_path / "page.png"
    await browse(f"--screenshot={shot}", "--window-size=400,300", site + "pages/green.html")
    width, height, colors = pixels(shot.read_bytes())
    assert (width, height) == (400, 300)
    green = sum(1 for color in colors if color == (0, 255, 0))
    red = sum(1 for color in colors if color == (255, 0, 0))
    assert red == 0, "the page's script ran"
    assert green > 0.9 * len(colors), "the page did not render"
