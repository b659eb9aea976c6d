"""Inputs for the shard-stage tests, made on the spot: photo-like images, every awkward image kind
the stage must convert or reject, and a small HTTP server on 127.0.0.1 that misbehaves on purpose."""
from __future__ import annotations

import functools
import io
import socket
import ssl
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import unquote

import numpy as np
from PIL import Image


def photo(seed: int, size: tuple[int, int] = (96, 72)) -> Image.Image:
    """Smooth colour fields plus fine noise: compresses and resizes like a photograph."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    noise = rng.normal(0, 8, (h, w, 1))
    return Image.fromarray(np.clip(np.asarray(base, np.float32) + noise, 0, 255).astype(np.uint8))


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def jpeg(seed: int, size: tuple[int, int] = (96, 72), quality: int = 90) -> bytes:
    return encode(photo(seed, size), "JPEG", quality=quality)


def exif_rotated_jpeg() -> bytes:
    """Stored sideways (EXIF orientation 6: rotate 90 degrees clockwise to view): upright it is 60 wide
    and 90 tall with a red top third; as stored it is 90x60 with the red band on the left."""
    upright = np.full((90, 60, 3), (0, 0, 255), np.uint8)
    upright[:30] = (255, 0, 0)
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)  # undo of orientation 6
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def rgba_png() -> bytes:
    """Left half fully transparent (must come out white), right half opaque green."""
    a = np.zeros((48, 64, 4), np.uint8)
    a[:, 32:] = (0, 200, 0, 255)
    a[:, :32] = (0, 0, 0, 0)
    return encode(Image.fromarray(a, "RGBA"), "PNG")


def palette_png() -> bytes:
    """A palette image whose index 0 is transparent (left half) and index 1 is blue."""
    im = Image.new("P", (64, 48), 0)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(1, (32, 0, 64, 48))
    return encode(im, "PNG", transparency=0)


def cmyk_jpeg() -> bytes:
    return encode(photo(7, (64, 48)).convert("CMYK"), "JPEG", quality=90)


def png16() -> bytes:
    """16-bit greyscale: left half 65535 (white), right half 32896 (mid grey, 128 after scaling)."""
    a = np.full((48, 64), 32896, np.uint16)
    a[:, :32] = 65535
    return encode(Image.fromarray(a), "PNG")  # uint16 -> mode I;16


def animated_gif() -> bytes:
    """Two frames: red first, then blue; the stage keeps the first."""
    red = Image.new("RGB", (40, 40), (255, 0, 0)).convert("P")
    blue = Image.new("RGB", (40, 40), (0, 0, 255)).convert("P")
    return encode(red, "GIF", save_all=True, append_images=[blue], duration=100, loop=0)


def truncated_jpeg() -> bytes:
    data = jpeg(3, (160, 120))
    return data[: len(data) // 2]


def oversized_png() -> bytes:
    """A real 400x400 image: over a ``max_pixels`` of 100000 set by the test."""
    return encode(Image.new("L", (400, 400), 128), "PNG")


def tiny_jpeg() -> bytes:
    return jpeg(4, (8, 8))


@functools.cache
def bomb_png() -> bytes:
    """9400x9400 RGBA, about 340 KB as PNG: under the default ``max_pixels``, 337 MiB once decoded."""
    return encode(Image.new("RGBA", (9400, 9400), (0, 0, 0, 0)), "PNG")


BAD_FILES = {  # name -> (bytes, expected reason)
    "truncated.jpg": (truncated_jpeg, "undecodable"),
    "empty.jpg": (lambda: b"", "empty"),
    "text.jpg": (lambda: b"just some text, not an image\n" * 20, "undecodable"),
    "page.jpg": (lambda: b"<!doctype html><html><body>Not found</body></html>", "undecodable"),
    "huge.png": (oversized_png, "too_large"),
    "tiny.jpg": (tiny_jpeg, "too_small"),
}
UNUSUAL_FILES = {  # valid-but-unusual: converted, never dropped
    "alpha.png": rgba_png,
    "palette.png": palette_png,
    "cmyk.jpg": cmyk_jpeg,
    "grey16.png": png16,
    "rotated.jpg": exif_rotated_jpeg,
    "animated.gif": animated_gif,
}
MAX_PIXELS = 100_000


class ImageServer:
    """HTTP on 127.0.0.1 with paths that succeed, fail, stall, reset and redirect.

    ``/img/NAME`` serves ``files[NAME]``; ``/noai/NAME`` the same with ``X-Robots-Tag: noai``;
    ``/missing`` is a 404; ``/slow`` answers after ``slow_s``; ``/reset`` drops the connection with a
    TCP reset; ``/redirect/NAME`` is a 302 to ``/img/NAME``; ``/goto/QUOTED`` a 302 to the URL-quoted
    location; ``/hold/NAME`` blocks its first request until ``release()`` (or ``hold_s``), later ones are
    served at once; ``/drip/NAME`` sends the headers, then the body one byte every ``drip_s``.
    ``paths`` lists the paths asked for; ``drips`` counts the bytes dripped so far; ``connections`` the
    connections accepted. With ``tls`` (a server context) it speaks HTTPS; ``protocol`` HTTP/1.1 keeps
    connections alive (http.server's default, HTTP/1.0, closes each after one response).
    """

    def __init__(self, files: dict[str, bytes], slow_s: float = 3.0, hold_s: float = 60.0,
                 drip_s: float = 0.25, host: str = "127.0.0.1", tls: Optional[ssl.SSLContext] = None,
                 protocol: str = "HTTP/1.0"):
        self.files, self.protocol = files, protocol
        self.connections = 0
        self.slow_s, self.hold_s, self.drip_s = slow_s, hold_s, drip_s
        self.paths: list[str] = []
        self.drips = 0
        self.held = threading.Event()  # a /hold request is waiting
        self._release = threading.Event()
        self._stop = threading.Event()
        self._holds_left = 1
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer((host, 0), self._handler())
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https" if tls is not None else "http"
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"{self.scheme}://{host}:{port}"

    def release(self) -> None:
        self._release.set()

    def arm_hold(self) -> None:
        """Make the next ``/hold`` request block again."""
        with self._lock:
            self._holds_left = 1
        self.held.clear()
        self._release.clear()

    def __enter__(self) -> "ImageServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._release.set()
        self.server.shutdown()
        self.server.server_close()

    def _take_hold(self) -> bool:
        with self._lock:
            if self._holds_left:
                self._holds_left -= 1
                return True
            return False

    def _handler(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = outer.protocol

            def setup(self) -> None:
                super().setup()
                with outer._lock:
                    outer.connections += 1

            def log_message(self, *args) -> None:  # keep test output clean
                pass

            def _send(self, body: bytes, status: int = 200, headers: Optional[dict] = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def _drip(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        outer.drips += 1
                        if outer._stop.wait(outer.drip_s):
                            return
                except OSError:  # the client hung up: what a deadline does
                    pass

            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                outer.paths.append(self.path)
                parts = self.path.strip("/").split("/", 1)
                head, name = parts[0], parts[1] if len(parts) > 1 else ""
                if head == "img" and name in outer.files:
                    self._send(outer.files[name])
                elif head == "noai" and name in outer.files:
                    self._send(outer.files[name], headers={"X-Robots-Tag": "noai, noimageai"})
                elif head == "redirect":
                    self._send(b"", 302, {"Location": f"/img/{name}"})
                elif head == "goto":
                    self._send(b"", 302, {"Location": unquote(name)})
                elif head == "drip" and name in outer.files:
                    self._drip(outer.files[name])
                elif head == "slow":
                    outer._stop.wait(outer.slow_s)
                    self._send(outer.files.get(name, b""))
                elif head == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                elif head == "hold" and name in outer.files:
                    if outer._take_hold():
                        outer.held.set()
                        outer._release.wait(outer.hold_s)
                    self._send(outer.files[name])
                else:
                    self._send(b"not found", 404)

        return Handler
