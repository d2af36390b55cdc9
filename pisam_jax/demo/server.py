"""HTTP for the demo: the page and a small JSON API over ``sessions``, on the standard library's threading server.

    GET  /                       the page (page.html: HTML, CSS and JavaScript in one file, nothing fetched elsewhere)
    GET  /api/info               the model, the limits, and what the model is compiling while it warms up
    POST /api/session            a new session: {"session": ID}; every call below names it as ?s=ID
    POST /api/image?s=ID         the body is an image file (header X-Filename: its name, URI-encoded) -> state
    POST /api/open?s=ID          {"path": "..."}: an image file on this machine             -> state
    POST /api/box?s=ID           {"box": [x0, y0, x1, y1]} in image pixels                  -> state
    POST /api/click?s=ID         {"x": int, "y": int, "foreground": bool}                   -> state
    POST /api/undo?s=ID, /api/reset?s=ID                                                     -> state
    GET  /api/image.jpg?s=ID     the image as the model sees it (EXIF orientation applied), for display
    GET  /api/mask.png?s=ID      the mask as a 0/255 PNG, to download
    GET  /api/overlay.png?s=ID   the image with the mask, its outline, the box and the clicks, to download

The state is ``Session.state()``. A request that cannot be done answers {"error": "one line"} with a 4xx status;
a fault of the demo itself answers 500 with one line and logs its traceback; the server keeps running.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from PIL import Image

from pisam_jax.data import images
from pisam_jax.demo.sessions import DemoError, Session, Sessions, check_size, mask_png
from pisam_jax.overlay import draw_overlay

log = logging.getLogger(__name__)

MAX_JSON_BYTES = 64 * 1024


class DemoServer(ThreadingHTTPServer):
    """The server: one thread per connection, every thread sharing ``sessions`` (and through it the model)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], sessions: Sessions | None = None, *, max_upload_bytes: int,
                 allow_paths: bool):
        """Listens on ``address`` at once; ``sessions`` may be set later, before ``serve_forever``."""
        super().__init__(address, Handler)
        self.sessions = sessions
        self.max_upload_bytes = max_upload_bytes
        self.allow_paths = allow_paths
        self.page = resources.files("pisam_jax.demo").joinpath("page.html").read_bytes()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}/"


class Handler(BaseHTTPRequestHandler):
    server: DemoServer
    protocol_version = "HTTP/1.1"

    # -- routing ------------------------------------------------------------------------------------------------

    def do_GET(self):
        self._handle({"/": self._page, "/api/info": self._info, "/api/state": self._state,
                      "/api/image.jpg": self._image_jpg, "/api/mask.png": self._mask_png,
                      "/api/overlay.png": self._overlay_png})

    def do_POST(self):
        self._handle({"/api/session": self._new_session, "/api/image": self._upload, "/api/open": self._open_path,
                      "/api/box": self._box, "/api/click": self._click, "/api/undo": self._undo,
                      "/api/reset": self._reset})

    def _handle(self, routes: dict) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        route = routes.get(url.path)
        try:
            self.body = self._read_body(url.path) if self.command == "POST" else b""  # all of it: keep-alive
            if route is None:
                raise DemoError(f"no such page: {self.command} {url.path}", 404)
            route()
        except DemoError as e:
            self._send_json({"error": str(e)}, e.status)
        except Exception as e:  # a fault of the demo: one line to the page, the traceback to the log
            log.error("%s %s failed:\n%s", self.command, url.path, traceback.format_exc())
            self._send_json({"error": f"the demo failed ({type(e).__name__}: {e}); see the server's log"}, 500)

    def log_message(self, format, *args):  # requests are not logged
        pass

    # -- pages --------------------------------------------------------------------------------------------------

    def _page(self):
        self._send(self.server.page, "text/html; charset=utf-8")

    def _info(self):
        engine = self.server.sessions.engine
        c = engine.config
        self._send_json({"model": engine.name, "decoder": engine.decoder, "model_type": c.model_type,
                         "image_size": c.image_size, "interactor": bool(c.interactor), "status": engine.status,
                         "max_megapixels": self.server.sessions.max_pixels / 1e6,
                         "max_upload_mb": self.server.max_upload_bytes / 2**20, "paths": self.server.allow_paths})

    def _new_session(self):
        self._send_json({"session": self.server.sessions.new().id})

    # -- actions on a session -----------------------------------------------------------------------------------

    def _session_action(self, act) -> None:
        session = self.server.sessions.get(self.query.get("s"))
        with session.lock:
            act(session)
            state = session.state()
        self._send_json(state)

    def _state(self):
        self._session_action(lambda s: None)

    def _upload(self):
        name = self._filename()
        self._session_action(lambda s: s.open_image(decode_upload(self.body, name, s.max_pixels), name))

    def _open_path(self):
        if not self.server.allow_paths:
            raise DemoError("opening paths on the server is off (demo.py --allow-paths turns it on); upload the "
                            "image instead", 403)
        path = str(self._json().get("path") or "").strip()
        if not path:
            raise DemoError("give the path of an image file on the server")
        path = os.path.expanduser(path)
        self._session_action(lambda s: s.open_image(read_path(path, s.max_pixels), Path(path).name))

    def _box(self):
        box = self._json().get("box")
        self._session_action(lambda s: s.set_box(box))

    def _click(self):
        body = self._json()
        self._session_action(lambda s: s.add_click(body.get("x"), body.get("y"), bool(body.get("foreground", True))))

    def _undo(self):
        self._session_action(Session.undo)

    def _reset(self):
        self._session_action(Session.reset)

    # -- pictures -----------------------------------------------------------------------------------------------

    def _picture(self, render, suffix: str | None, content_type: str) -> None:
        session = self.server.sessions.get(self.query.get("s"))
        with session.lock:
            if session.image is None:
                raise DemoError("open an image first", 404)
            data = render(session)
            filename = f"{Path(session.name).stem}_{suffix}" if suffix else None
        self._send(data, content_type, filename=filename)

    def _image_jpg(self):
        self._picture(lambda s: encode(Image.fromarray(s.image), "JPEG", quality=92), None, "image/jpeg")

    def _mask_png(self):
        self._picture(lambda s: mask_png(s.mask), "mask.png", "image/png")

    def _overlay_png(self):
        def render(s: Session) -> bytes:
            clicks = np.array([c[:2] for c in s.prompts.clicks], np.float32).reshape(-1, 2)
            labels = np.array([int(c[2]) for c in s.prompts.clicks])
            picture = draw_overlay(s.image, s.mask, box=s.prompts.box, points=clicks, labels=labels)
            return encode(picture, "PNG")

        self._picture(render, "overlay.png", "image/png")

    # -- bodies and answers -------------------------------------------------------------------------------------

    def _filename(self) -> str:
        return Path(unquote(self.headers.get("X-Filename") or "upload")).name or "upload"

    def _read_body(self, path: str) -> bytes:
        """The request's body, read whole (the next request on the connection starts after it)."""
        limit, too_large = ((self.server.max_upload_bytes, f"{self._filename()} is too large to upload")
                            if path == "/api/image" else (MAX_JSON_BYTES, "the request"))
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise DemoError("the request's Content-Length is not a number", 400) from None
        if length > limit:
            left = length
            while left > 0:  # read and dropped, so that the client hears the answer
                chunk = self.rfile.read(min(2**20, left))
                if not chunk:
                    break
                left -= len(chunk)
            raise DemoError(f"{too_large}: {length / 2**20:.1f} MB; the demo takes at most {limit / 2**20:g} MB "
                            "(demo.py --max-upload-mb)", 413)
        return self.rfile.read(length)

    def _json(self) -> dict:
        try:
            value = json.loads(self.body or b"{}")
        except ValueError:
            raise DemoError("the request's body is not JSON") from None
        if not isinstance(value, dict):
            raise DemoError("the request's body must be a JSON object")
        return value

    def _send_json(self, value, status: int = 200) -> None:
        self._send(json.dumps(value).encode(), "application/json", status=status)

    def _send(self, data: bytes, content_type: str, *, status: int = 200, filename: str | None = None) -> None:
        self.send_response(status, HTTPStatus(status).phrase)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if filename:
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", filename)
            self.send_header("Content-Disposition", f'attachment; filename="{safe}"')
        self.end_headers()
        self.wfile.write(data)


def encode(picture: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    picture.save(buf, format=fmt, **options)
    return buf.getvalue()


def read_path(path: str, max_pixels: int) -> np.ndarray:
    """The image file at ``path`` as (H, W, 3) uint8 (``data.images.read_image``), its size checked from the
    header before it is decoded."""
    if os.path.isdir(path):
        raise DemoError(f"{path} is a folder; give the path of an image file")
    if not os.path.isfile(path):
        raise DemoError(f"{path}: file not found on the server")
    try:
        check_size(images.read_size(path), max_pixels, Path(path).name)
        image = images.read_image(path)
    except images.ImageReadError:
        raise DemoError(f"{Path(path).name} is not an image the demo can read (corrupt, or not an image file); "
                        "open a PNG, JPEG, TIFF, BMP or WebP image") from None
    check_size(image.shape[:2], max_pixels, Path(path).name)
    return image


def decode_upload(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """An uploaded file's bytes as an image (``read_path`` on a temporary copy, removed again)."""
    if not data:
        raise DemoError(f"{name} is empty; open an image file")
    fd, tmp = tempfile.mkstemp(prefix="pisam-demo-", suffix=Path(name).suffix[:16])
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            return read_path(tmp, max_pixels)
        except DemoError as e:
            raise DemoError(str(e).replace(tmp, name).replace(Path(tmp).name, name), e.status) from None
    finally:
        os.unlink(tmp)
