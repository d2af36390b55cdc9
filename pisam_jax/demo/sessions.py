"""The demo's state: one model shared by every browser session; each session its own image, prompts and undo history.

    engine = Engine(load_model("checkpoints/pisam_vit_b"), name="pisam_vit_b")
    sessions = Sessions(engine, max_sessions=8)
    session = sessions.new()
    session.open_image(image, "photo.jpg")      # (H, W, 3) uint8: the encoder runs once per image
    session.set_box((40, 30, 280, 200))         # x0 y0 x1 y1 in image pixels
    session.add_click(150, 120, foreground=True)
    session.undo(); session.reset()
    session.mask                                # (H, W) bool; session.latency: what the last action cost

Prompts follow the evaluation's protocol (``evaluation.segmenter``), so a mask here is the mask ``eval.py`` would
score for the same box and clicks:

* SAM, HQ-SAM: the box alone with ``multimask_output=False``; after clicks, the box, every click as a point and
  the box's low-res logits as ``mask_input`` (PISAM_SPEC 6), again single-mask. Without a box, the first click
  alone gives SAM's three masks and keeps the best-scored one (a single point is ambiguous), and later clicks
  re-prompt with that mask's logits.
* Pi-SAM: ``Predictor.predict(box=...)``, then ``Predictor.refine(clicks)`` runs only the interactor and the HR
  head on the features cached for the box. A click needs a box first.

A mask is a function of the current box and clicks alone, so undo is a step back in the list of prompt states,
recomputed (the box's prediction is cached, so undoing a click costs a click).

Concurrency: the model's work runs under one lock (on a CPU one encoder already uses every core), with the
``Predictor``'s per-image state (features, sizes, Pi-SAM's box features) put in place for the session being
served; a session's own requests run one at a time under its own lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import secrets
import threading
import time
from collections import OrderedDict

import jax
import numpy as np
from PIL import Image

from pisam_jax import transforms
from pisam_jax.predictor import Predictor, PromptError

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class DemoError(ValueError):
    """A request the demo cannot do as asked; the message (one line) is shown in the page. ``status``: HTTP."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Prompts:
    """A session's prompts: box (x0, y0, x1, y1) or None, clicks ((x, y, is_foreground), ...) in image pixels."""

    box: tuple[float, float, float, float] | None = None
    clicks: tuple[tuple[int, int, bool], ...] = ()

    @property
    def empty(self) -> bool:
        return self.box is None and not self.clicks


@dataclasses.dataclass(frozen=True)
class Latency:
    """What the last action cost on the server: ``ms`` in all (waiting for the model included), of which
    ``compile_ms`` compiling a new shape (first use of a click count or an image size)."""

    action: str
    ms: float
    compile_ms: float


@dataclasses.dataclass
class Encoded:
    """What ``Predictor.set_image`` computed for one image: its features and sizes."""

    features: object
    original_size: tuple[int, int]
    input_size: tuple[int, int]


@dataclasses.dataclass
class Base:
    """The prediction that clicks correct, cached per session: ``key`` the prompt it came from (the box, or the
    first click without a box), ``mask`` (H, W) bool, SAM's ``low_res`` (1, 256, 256) or Pi-SAM's ``pi_base``."""

    key: object
    mask: np.ndarray
    low_res: np.ndarray | None = None
    pi_base: object = None


# -- compile time: jax reports each backend compilation; the model's thread adds it up ----------------------

_compiling = threading.local()
_listening = False


def _on_duration(event: str, duration: float, **_) -> None:
    if event == COMPILE_EVENT:
        _compiling.seconds = getattr(_compiling, "seconds", 0.0) + duration


def _listen_to_compiles() -> None:
    global _listening
    if not _listening:
        jax.monitoring.register_event_duration_secs_listener(_on_duration)
        _listening = True


class Engine:
    """The one model in memory, behind a lock; its methods take a session's state and return results."""

    def __init__(self, model, *, name: str, hq_token_only: bool = False):
        _listen_to_compiles()
        self.name = name
        self.config = model.config
        self.decoder = model.config.decoder
        self.predictor = Predictor(model)
        self._kw = {"hq_token_only": True} if hq_token_only and self.decoder == "hq" else {}
        self._lock = threading.Lock()
        self.status = "ready"

    @property
    def is_pi(self) -> bool:
        return self.decoder == "pi"

    @contextlib.contextmanager
    def timed(self, action: str, out: list):
        """Runs the block under the model lock; appends its ``Latency`` to ``out`` (also when it fails)."""
        start = time.perf_counter()
        with self._lock:
            before = getattr(_compiling, "seconds", 0.0)
            try:
                yield
            finally:
                compile_s = getattr(_compiling, "seconds", 0.0) - before
                out.append(Latency(action, 1000 * (time.perf_counter() - start), 1000 * compile_s))

    def encode(self, image: np.ndarray) -> Encoded:
        """Runs the encoder on ``image`` (H, W, 3) uint8 (call inside ``timed``)."""
        p = self.predictor
        p.set_image(image)
        jax.block_until_ready(p.features)  # the encoder's time is the image's, not the first click's
        return Encoded(p.features, p.original_size, p.input_size)

    def segment(self, encoded: Encoded, prompts: Prompts, base: Base | None) -> tuple[np.ndarray, Base | None]:
        """The mask (H, W) bool for ``prompts`` on the encoded image, and the ``Base`` to keep (call inside
        ``timed``). ``base``: the session's cached one, reused when its key still holds."""
        p = self.predictor
        p.features, p.original_size, p.input_size = encoded.features, encoded.original_size, encoded.input_size
        p.pi_base = None
        if prompts.empty:
            return np.zeros(encoded.original_size, bool), base
        if self.is_pi:
            return self._segment_pi(prompts, base)
        key = prompts.box if prompts.box is not None else ("click", prompts.clicks[0])
        if base is None or base.key != key:
            base = self._sam_base(prompts, key)
        if len(prompts.clicks) == (0 if prompts.box is not None else 1):  # nothing beyond the base's prompt
            return base.mask, base
        coords = np.array([c[:2] for c in prompts.clicks], np.float32)
        labels = np.array([int(c[2]) for c in prompts.clicks], np.int32)
        box = None if prompts.box is None else np.array(prompts.box, np.float32)
        masks, _, _ = p.predict(coords, labels, box=box, mask_input=base.low_res, multimask_output=False, **self._kw)
        return masks[0], base

    def _sam_base(self, prompts: Prompts, key) -> Base:
        p = self.predictor
        if prompts.box is not None:
            masks, scores, low_res = p.predict(box=np.array(prompts.box, np.float32), multimask_output=False,
                                               **self._kw)
        else:
            x, y, foreground = prompts.clicks[0]
            masks, scores, low_res = p.predict(np.array([[x, y]], np.float32), np.array([int(foreground)]),
                                               multimask_output=True, **self._kw)
        best = int(np.argmax(scores))
        return Base(key, masks[best], low_res=low_res[best:best + 1])

    def _segment_pi(self, prompts: Prompts, base: Base | None) -> tuple[np.ndarray, Base]:
        p = self.predictor
        if prompts.box is None:
            raise DemoError("Pi-SAM corrects the mask of a box: drag a box around the object first, then click")
        if prompts.clicks and not self.config.interactor:
            raise DemoError("this Pi-SAM model has no Precise Interactor (a stage-1 model): it takes a box only; "
                            "use a stage-2 model for clicks")
        if base is None or base.key != prompts.box:
            masks, _, _ = p.predict(box=np.array(prompts.box, np.float32))
            base = Base(prompts.box, masks[0], pi_base=p.pi_base)
        if not prompts.clicks:
            return base.mask, base
        p.pi_base = base.pi_base
        return p.refine(list(prompts.clicks))[0], base

    def warm_up(self, clicks: int, report=print) -> None:
        """Compiles the encoder, the box prompt and 1..``clicks`` clicks on a blank image, so that a visitor's
        first actions do not wait for XLA (SAM compiles once per click count; Pi-SAM once per 10 clicks)."""
        image = np.zeros((self.config.image_size * 3 // 4, self.config.image_size, 3), np.uint8)
        h, w = image.shape[:2]
        box = (w / 4, h / 4, 3 * w / 4, 3 * h / 4)
        if self.is_pi:  # one compilation serves 1..10 clicks (Predictor pads them); a stage-1 model takes none
            clicks = min(clicks, 1 if self.config.interactor else 0)
        steps = [Prompts(box)] + [Prompts(box, tuple((w // 2 + i, h // 2, True) for i in range(n)))
                                  for n in range(1, clicks + 1)]
        done: list[Latency] = []
        try:
            self.status = "compiling the encoder"
            with self.timed("warm-up encoder", done):
                encoded = self.encode(image)
            report(f"{self.status}: {done[-1].ms / 1000:.1f} s")
            base = None
            for i, prompts in enumerate(steps):
                self.status = "compiling the box prompt" if i == 0 else f"compiling clicks: {i} of {len(steps) - 1}"
                with self.timed(self.status, done):
                    _, base = self.segment(encoded, prompts, base)
                report(f"{self.status}: {done[-1].ms / 1000:.1f} s")
        finally:  # the page waits for "ready": a failed warm-up leaves compiling to first use
            self.status = "ready"


class Session:
    """One visitor's image, prompts and undo history. The server calls it under ``lock``, one request at a time;
    an action that fails changes nothing."""

    def __init__(self, engine: Engine, session_id: str, max_pixels: int):
        self.engine = engine
        self.id = session_id
        self.max_pixels = max_pixels
        self.lock = threading.Lock()
        self.image: np.ndarray | None = None
        self.name = ""
        self.version = 0  # counts the images opened, so that the page never shows an old one from its cache
        self._encoded: Encoded | None = None
        self._base: Base | None = None
        self.history: list[Prompts] = [Prompts()]
        self.mask: np.ndarray | None = None
        self.latency: Latency | None = None

    @property
    def prompts(self) -> Prompts:
        return self.history[-1]

    # -- actions --------------------------------------------------------------------------------------------

    def open_image(self, image: np.ndarray, name: str) -> None:
        """Encodes ``image`` (H, W, 3) uint8 and forgets the last image's prompts."""
        check_size(image.shape[:2], self.max_pixels, name)
        done: list[Latency] = []
        with self.engine.timed("open image", done):
            encoded = self.engine.encode(image)
            mask, base = self.engine.segment(encoded, Prompts(), None)
        self.image, self.name, self.version = image, name, self.version + 1
        self._encoded, self._base, self.history, self.mask = encoded, base, [Prompts()], mask
        self.latency = done[-1]

    def set_box(self, box) -> None:
        """A new box (x0, y0, x1, y1) in image pixels; it starts over: the clicks of the last box are dropped."""
        self._need_image()
        self._apply("box", Prompts(self._check_box(box)))

    def add_click(self, x, y, foreground: bool) -> None:
        self._need_image()
        x, y = self._check_click(x, y)
        prompts = self.prompts
        self._apply("foreground click" if foreground else "background click",
                    Prompts(prompts.box, prompts.clicks + ((x, y, bool(foreground)),)))

    def undo(self) -> None:
        if len(self.history) < 2:
            raise DemoError("nothing to undo")
        self._apply("undo", self.history[-2], push=False)

    def reset(self) -> None:
        """Clears the box and the clicks (undo brings them back)."""
        self._need_image()
        if not self.prompts.empty:
            self._apply("reset", Prompts())

    def _apply(self, action: str, prompts: Prompts, push: bool = True) -> None:
        done: list[Latency] = []
        try:
            with self.engine.timed(action, done):
                mask, base = self.engine.segment(self._encoded, prompts, self._base)
        except PromptError as e:
            raise DemoError(str(e)) from None
        self.history = self.history + [prompts] if push else self.history[:-1]
        self.mask, self._base, self.latency = mask, base, done[-1]

    # -- checks ---------------------------------------------------------------------------------------------

    def _need_image(self) -> None:
        if self.image is None:
            raise DemoError("open an image first (upload one, or give its path)")

    def _check_box(self, box) -> tuple[float, float, float, float]:
        h, w = self.image.shape[:2]
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise DemoError(f"a box is four numbers x0, y0, x1, y1, got {box!r}") from None
        if problem := transforms.box_problem((x0, y0, x1, y1), w, h):
            raise DemoError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) {problem}")
        return x0, y0, x1, y1

    def _check_click(self, x, y) -> tuple[int, int]:
        h, w = self.image.shape[:2]
        if isinstance(x, bool) or isinstance(y, bool) or not isinstance(x, int) or not isinstance(y, int):
            raise DemoError(f"a click is at whole pixel coordinates x, y, got {x!r}, {y!r}")
        if not (0 <= x < w and 0 <= y < h):
            raise DemoError(f"click ({x}, {y}) lies outside the {w}x{h} image (x in [0, {w}), y in [0, {h}))")
        return x, y

    # -- what the page gets ---------------------------------------------------------------------------------

    def state(self) -> dict:
        """The page's view: image size, prompts, latency and the mask as a PNG (base64), JSON-ready."""
        import base64

        out = {"session": self.id, "image": None, "box": None, "clicks": [], "can_undo": len(self.history) > 1,
               "mask_png": None, "latency": None, "model": self.engine.name}
        if self.image is None:
            return out
        h, w = self.image.shape[:2]
        out.update(image={"width": w, "height": h, "name": self.name, "version": self.version},
                   box=self.prompts.box, clicks=[[x, y, fg] for x, y, fg in self.prompts.clicks],
                   mask_png=base64.b64encode(mask_png(self.mask, fast=True)).decode("ascii"),
                   mask_pixels=int(self.mask.sum()))
        if self.latency is not None:
            out["latency"] = dataclasses.asdict(self.latency)
        return out


def check_size(size: tuple[int, int], max_pixels: int, name: str = "the image") -> None:
    h, w = size
    if h * w > max_pixels:
        raise DemoError(f"{name} is {w}x{h} ({h * w / 1e6:.1f} megapixels); the demo takes at most "
                        f"{max_pixels / 1e6:g} megapixels (demo.py --max-megapixels): downscale it first", 413)


def mask_png(mask: np.ndarray, fast: bool = False) -> bytes:
    """(H, W) bool -> an 8-bit 0/255 PNG, as predict.py and eval.py write masks; ``fast``: a 1-bit PNG, lightly
    compressed, for the page (a quarter of the time: 6 ms instead of 22-30 for 1280x960; 0/255 when read)."""
    buf = io.BytesIO()
    mask = np.asarray(mask, bool)
    if fast:
        Image.fromarray(mask).save(buf, format="PNG", compress_level=1)
    else:
        Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


class Sessions:
    """The sessions, by id; beyond ``max_sessions`` the least recently used one is forgotten."""

    def __init__(self, engine: Engine, *, max_sessions: int = 8, max_pixels: int = 40_000_000):
        self.engine = engine
        self.max_sessions = max_sessions
        self.max_pixels = max_pixels
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def new(self) -> Session:
        with self._lock:
            session = Session(self.engine, secrets.token_urlsafe(16), self.max_pixels)
            self._sessions[session.id] = session
            while len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
            return session

    def get(self, session_id: str | None) -> Session:
        with self._lock:
            session = self._sessions.get(session_id or "")
            if session is None:
                raise DemoError(f"this page's session has ended (the server keeps the {self.max_sessions} most "
                                "recent, and forgets all when it restarts): reload the page", 410)
            self._sessions.move_to_end(session.id)
            return session
