"""demo.py: the web demo's server, sessions and page.

The models are tiny random ones (128 px input). The server runs in a thread of this process, on 127.0.0.1 and a
free port. Masks are compared with ``Predictor`` called directly on the same image with the same prompts, by the
evaluation's protocol: exactly, since it is the same computation on the same machine.

The browser tests drive headless Chromium (Debian's ``chromium`` and ``chromium-driver``; .ci/run installs them)
through Selenium: upload, a box, a foreground and a background click, undo; they read back the mask the page
received, and the mask layer it painted, and save a screenshot (``PISAM_DEMO_SCREENSHOTS=DIR`` keeps them).
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from pisam_jax import overlay
from pisam_jax.demo.server import DemoServer
from pisam_jax.demo.sessions import Engine, Sessions
from pisam_jax.models import ModelConfig, build_model, save_model

TINY = dict(image_size=128, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
            encoder_global_attn_indexes=(1,), window_size=4)
BOX = (40.0, 30.0, 200.0, 150.0)
CLICKS = ((100, 80, True), (60, 60, False))
REPO = Path(__file__).resolve().parents[1]


def tiny_model(decoder: str):
    """A tiny random model, its parameters drawn with numpy: weights uniform in +-1/sqrt(fan_in) as PyTorch's
    layers draw them, embeddings normal, norms' scales 1 and biases 0 (random biases saturate Pi-SAM's random
    head: all foreground). No compilation, where ``build_model`` compiles each initialiser (a minute here); and
    Pi-SAM's interactor, zero-initialised there, gets an effect."""
    config = ModelConfig(decoder=decoder, interactor=decoder == "pi", **TINY)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(config)))
    rng = np.random.default_rng(1)

    def draw(path, leaf):
        name = str(getattr(path[-1], "key", path[-1]))
        if name in ("scale", "bias"):
            return np.full(leaf.shape, name == "scale", leaf.dtype)
        if name == "embedding":
            return rng.normal(size=leaf.shape).astype(leaf.dtype)
        bound = 1 / np.sqrt(np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else leaf.shape[0])
        return rng.uniform(-bound, bound, leaf.shape).astype(leaf.dtype)

    pure = jax.tree_util.tree_map_with_path(draw, state.to_pure_dict())
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def picture(seed: int, size=(192, 256)) -> np.ndarray:
    """A smooth random image: blobs the random models respond to unevenly."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(small).resize(size[::-1], Image.BICUBIC))


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def direct(predictor, image, box, clicks, decoder: str) -> np.ndarray:
    """The mask for ``box`` and ``clicks`` from ``Predictor`` itself, by the evaluation's protocol."""
    predictor.set_image(image)
    if decoder == "pi":
        masks, _, _ = predictor.predict(box=np.array(box))
        return predictor.refine(list(clicks))[0] if clicks else masks[0]
    masks, _, low_res = predictor.predict(box=np.array(box), multimask_output=False)
    if not clicks:
        return masks[0]
    coords = np.array([c[:2] for c in clicks], np.float32)
    labels = np.array([int(c[2]) for c in clicks])
    return predictor.predict(coords, labels, box=np.array(box), mask_input=low_res, multimask_output=False)[0][0]


class Client:
    """One browser session's worth of HTTP calls."""

    def __init__(self, url: str):
        self.url = url
        self.session = self.call("session")["session"]

    def call(self, path, body=None, *, raw: bytes | None = None, headers=None, method="POST"):
        sep = "&" if "?" in path else "?"
        url = f"{self.url}api/{path}" + (f"{sep}s={self.session}" if getattr(self, "session", None) else "")
        data = raw if raw is not None else (json.dumps(body or {}).encode() if method == "POST" else None)
        request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                payload = r.read()
                return json.loads(payload) if r.headers["Content-Type"] == "application/json" else payload
        except urllib.error.HTTPError as e:
            return {"status": e.code, **json.loads(e.read())}

    def upload(self, image: np.ndarray, name="im.png"):
        return self.call("image", raw=png(image), headers={"X-Filename": name})


def mask_of(state) -> np.ndarray:
    import base64

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(state["mask_png"]))).convert("L")) > 127


def serve(model, name: str, **limits):
    engine = Engine(model, name=name)
    server = DemoServer(("127.0.0.1", 0), Sessions(engine, max_sessions=4, max_pixels=limits.get("max_pixels", 10**6)),
                        max_upload_bytes=limits.get("max_upload_bytes", 2**20), allow_paths=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, engine


@pytest.fixture(scope="module", params=["sam", "pi"])
def demo(request):
    server, engine = serve(tiny_model(request.param), f"tiny_{request.param}")
    yield server, engine
    server.shutdown()
    server.server_close()


# -- the API --------------------------------------------------------------------------------------------------


def test_box_clicks_undo_reset_match_the_predictor(demo):
    server, engine = demo
    image = picture(0)
    c = Client(server.url)
    state = c.upload(image)
    assert state["image"] == {"width": 256, "height": 192, "name": "im.png", "version": 1}
    assert not mask_of(state).any() and state["latency"]["action"] == "open image"
    masks = [mask_of(c.call("box", {"box": BOX}))]
    for x, y, fg in CLICKS:
        masks.append(mask_of(c.call("click", {"x": x, "y": y, "foreground": fg})))
    undone = c.call("undo")
    assert undone["clicks"] == [list(CLICKS[0])] and undone["box"] == list(BOX)
    expected = [direct(engine.predictor, image, BOX, CLICKS[:n], engine.decoder) for n in range(3)]
    for n in range(3):
        np.testing.assert_array_equal(masks[n], expected[n], err_msg=f"after the box and {n} clicks")
    np.testing.assert_array_equal(mask_of(undone), expected[1])
    # the prompts matter (else the comparisons above could not fail): each click changes the mask
    assert (expected[0] != expected[1]).sum() > 50 and (expected[1] != expected[2]).sum() > 50
    assert 0.05 < expected[0].mean() < 0.95
    reset = c.call("reset")
    assert reset["box"] is None and not mask_of(reset).any() and reset["can_undo"]
    np.testing.assert_array_equal(mask_of(c.call("undo")), expected[1])
    # the downloads: the mask as 0/255, the overlay with the mask's outline drawn
    got = np.asarray(Image.open(io.BytesIO(c.call("mask.png", method="GET"))))
    np.testing.assert_array_equal(got > 127, expected[1])
    over = np.asarray(Image.open(io.BytesIO(c.call("overlay.png", method="GET"))))
    light, _ = overlay.outline(expected[1], 1)
    assert over.shape == (192, 256, 3) and (over[light] == overlay.OUTLINE).all(axis=-1).mean() > 0.5


def test_two_sessions_at_once_do_not_mix(demo):
    """Two visitors, two images, their requests interleaved from two threads: each gets its own masks."""
    server, engine = demo
    images = [picture(1), picture(2)]
    clients = [Client(server.url), Client(server.url)]
    barrier = threading.Barrier(2)

    def visit(i):
        c = clients[i]
        barrier.wait()
        c.upload(images[i], f"im{i}.png")
        got = [mask_of(c.call("box", {"box": BOX}))]
        for x, y, fg in CLICKS:
            got.append(mask_of(c.call("click", {"x": x + i, "y": y, "foreground": fg})))
        return got

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(visit, range(2)))
    for i in range(2):
        clicks = tuple((x + i, y, fg) for x, y, fg in CLICKS)
        for n in range(3):
            np.testing.assert_array_equal(results[i][n], direct(engine.predictor, images[i], BOX, clicks[:n],
                                                                engine.decoder), err_msg=f"visitor {i}, step {n}")
    assert (results[0][2] != results[1][2]).any()
    assert clients[0].call("state", method="GET")["image"]["name"] == "im0.png"


def test_bad_input_answers_one_line_and_the_server_goes_on(demo, tmp_path):
    server, engine = demo
    c = Client(server.url)
    r = c.call("click", {"x": 1, "y": 1, "foreground": True})
    assert r["status"] == 400 and r["error"].startswith("open an image first")
    r = c.call("image", raw=b"these are my notes, not a picture", headers={"X-Filename": "notes.txt"})
    assert r["status"] == 400 and r["error"].startswith("notes.txt is not an image the demo can read")
    big = np.zeros((1100, 1000, 3), np.uint8)  # 1.1 megapixels; this server takes 1
    r = c.upload(big, "big.png")
    assert r["status"] == 413
    assert r["error"].startswith("big.png is 1000x1100 (1.1 megapixels); the demo takes at most 1 megapixels")
    r = c.call("image", raw=b"x" * (2**20 + 1), headers={"X-Filename": "huge.jpg"})
    assert r["status"] == 413 and "huge.jpg is too large" in r["error"]
    r = c.call("open", {"path": str(tmp_path / "missing.png")})
    assert r["status"] == 400 and "missing.png: file not found" in r["error"]
    Image.fromarray(picture(3)).save(tmp_path / "ok.png")
    state = c.call("open", {"path": str(tmp_path / "ok.png")})
    assert state["image"]["name"] == "ok.png"
    r = c.call("click", {"x": 256, "y": 10, "foreground": True})
    assert r["status"] == 400 and "click (256, 10) lies outside the 256x192 image" in r["error"]
    r = c.call("click", {"x": 1.5, "y": 10, "foreground": True})
    assert r["status"] == 400 and "whole pixel" in r["error"]
    r = c.call("box", {"box": [10, 10, 10, 50]})
    assert r["status"] == 400 and "box (10, 10, 10, 50) has zero area" in r["error"]
    r = c.call("box", {"box": [10, 10, 300, 50]})
    assert r["status"] == 400 and "outside the 256x192 image" in r["error"]
    r = c.call("click", {"x": 5, "y": 6, "foreground": True})
    if engine.is_pi:
        assert r["status"] == 400 and r["error"].startswith("Pi-SAM corrects the mask of a box: drag a box")
        assert c.call("state", method="GET")["clicks"] == []  # a failed action changes nothing
    else:  # SAM takes a click alone
        assert r["clicks"] == [[5, 6, True]]
    r = c.call("nowhere")
    assert r["status"] == 404
    other = Client(server.url)
    other.session = "not-a-session"
    r = other.call("state", method="GET")
    assert r["status"] == 410 and "reload the page" in r["error"]
    # and the server still works
    assert mask_of(c.call("box", {"box": BOX})).shape == (192, 256)


def test_sessions_beyond_the_limit_are_forgotten_oldest_first(demo):
    server, _ = demo
    first = Client(server.url)
    for _ in range(4):
        Client(server.url)
    assert first.call("state", method="GET")["status"] == 410


# -- the command line -----------------------------------------------------------------------------------------


def run_demo(*args):
    return subprocess.run([sys.executable, str(REPO / "demo.py"), *args], capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=REPO)


def test_command_line_errors_exit_2(tmp_path):
    r = run_demo("--model", str(tmp_path / "nowhere"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "nowhere" in r.stderr
    r = run_demo("--model", str(tmp_path), "--port", "70000")
    assert r.returncode == 2 and "--port 70000" in r.stderr
    save_model(tiny_model("sam"), tmp_path / "sam")
    r = run_demo("--model", str(tmp_path / "sam"), "--hq-token-only")
    assert r.returncode == 2 and "--hq-token-only needs an HQ-SAM model" in r.stderr
    with DemoServer(("127.0.0.1", 0), max_upload_bytes=1, allow_paths=False) as taken:
        port = str(taken.server_address[1])
        r = run_demo("--model", str(tmp_path / "sam"), "--port", port)
    assert r.returncode == 2 and f"port {port} on 127.0.0.1 is in use" in r.stderr


# -- in a real browser ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    binary, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert binary and driver, "the browser tests need Debian's chromium and chromium-driver (.ci/run installs them)"
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=900,700", "--force-device-scale-factor=1"):
        options.add_argument(flag)
    profile = Path(__import__("tempfile").mkdtemp(prefix="pisam-demo-chromium-"))
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait_for(driver, script: str, timeout=120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(script))


def settle(driver):
    """Waits until the page has finished every action it queued."""
    wait_for(driver, "return window.demo.busy === 0")


def page_mask(driver) -> np.ndarray:
    return mask_of(driver.execute_script("return window.demo.state"))


def painted(driver) -> np.ndarray:
    """The mask layer's pixels (H, W, 4) as the page painted them."""
    data = driver.execute_script(
        "const c = document.getElementById('mask-layer');"
        "return Array.from(c.getContext('2d').getImageData(0, 0, c.width, c.height).data);")
    h, w = driver.execute_script("const c = document.getElementById('mask-layer'); return [c.height, c.width];")
    return np.array(data, np.uint8).reshape(h, w, 4)


def expected_layer(mask: np.ndarray) -> np.ndarray:
    """What the page should paint for ``mask`` shown at 1:1: 0 clear, 1 fill, 2 light outline, 3 dark outline."""
    light, dark = overlay.outline(mask, 1)
    return np.select([light, dark, mask], [2, 3, 1], 0)


def layer_classes(pixels: np.ndarray) -> np.ndarray:
    alpha, rgb = pixels[..., 3], pixels[..., :3].astype(int)
    opaque = alpha == 255
    fill = (np.abs(alpha.astype(int) - 128) <= 1) & (np.abs(rgb - [30, 144, 255]).max(-1) <= 2)
    return np.select([opaque & (rgb.min(-1) == 255), opaque & (rgb.max(-1) == 0), fill], [2, 3, 1], 0)


def test_in_the_browser_upload_box_two_clicks_undo(demo, browser, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    server, engine = demo
    image = picture(4)
    (tmp_path / "photo.png").write_bytes(png(image))
    (tmp_path / "notes.txt").write_text("not an image")
    browser.get(server.url)
    wait_for(browser, "return window.demo.ready === true")
    assert engine.name in browser.find_element(By.ID, "model").text

    def upload(path):
        browser.find_element(By.ID, "file").send_keys(str(path))
        settle(browser)

    upload(tmp_path / "notes.txt")  # a bad file: a message in the page, nothing else changes
    message = browser.find_element(By.ID, "message")
    assert "notes.txt is not an image" in message.text and message.get_attribute("class") == "error"
    (tmp_path / "huge.png").write_bytes(png(np.zeros((1100, 1000, 3), np.uint8)))  # this server takes 1 MP
    upload(tmp_path / "huge.png")
    assert message.text.startswith("huge.png is 1000x1100 (1.1 megapixels); the demo takes at most 1 megapixels")
    assert browser.execute_script("return window.demo.state") is None  # nothing opened yet
    upload(tmp_path / "photo.png")
    assert browser.execute_script("return window.demo.state.image.width") == 256
    layer = browser.find_element(By.ID, "prompt-layer")
    assert (layer.size["width"], layer.size["height"]) == (256, 192)  # shown at 1:1: one pixel, one pixel

    def at(x, y):  # selenium offsets are from the element's centre
        return x - 128, y - 96

    if engine.is_pi:  # a click before the box: a message in the page
        ActionChains(browser).move_to_element_with_offset(layer, *at(100, 80)).click().perform()
        settle(browser)
        assert "drag a box around the object first" in message.text
    ActionChains(browser).move_to_element_with_offset(layer, *at(40, 30)).click_and_hold() \
        .move_by_offset(80, 60).move_by_offset(80, 60).release().perform()
    settle(browser)
    state = browser.execute_script("return window.demo.state")
    assert state["box"] is not None and np.abs(np.array(state["box"]) - BOX).max() <= 1, state["box"]
    box = tuple(state["box"])
    ActionChains(browser).move_to_element_with_offset(layer, *at(100, 80)).click().perform()  # left: foreground
    ActionChains(browser).move_to_element_with_offset(layer, *at(60, 60)).context_click().perform()  # right: background
    settle(browser)
    state = browser.execute_script("return window.demo.state")
    clicks = [tuple(c) for c in state["clicks"]]
    assert len(clicks) == 2 and clicks[0][2] is True and clicks[1][2] is False
    assert all(abs(c[0] - e[0]) <= 1 and abs(c[1] - e[1]) <= 1 for c, e in zip(clicks, CLICKS)), clicks
    two = page_mask(browser)
    np.testing.assert_array_equal(two, direct(engine.predictor, image, box, clicks, engine.decoder))
    np.testing.assert_array_equal(layer_classes(painted(browser)), expected_layer(two))
    browser.find_element(By.ID, "undo").click()
    settle(browser)
    one = page_mask(browser)
    expected = direct(engine.predictor, image, box, clicks[:1], engine.decoder)
    np.testing.assert_array_equal(one, expected)
    assert (one != two).sum() > 50, "undo changed the mask back"
    np.testing.assert_array_equal(layer_classes(painted(browser)), expected_layer(expected))
    latency = browser.find_element(By.ID, "latency").text
    assert latency.startswith("Last action: undo:") and "ms in the browser (model" in latency
    assert browser.find_element(By.ID, "download-mask").get_attribute("download") == "photo_mask.png"
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE" and "/api/" not in e["message"]]
    assert not errors, errors  # no script errors (failed API calls are the bad input above, reported as 4xx)
    shots = Path(os.environ.get("PISAM_DEMO_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shots / f"demo_{engine.decoder}.png"))
    # another image: its own size, no prompts, an empty mask
    (tmp_path / "second.png").write_bytes(png(picture(5, (120, 160))))
    upload(tmp_path / "second.png")
    state = browser.execute_script("return window.demo.state")
    assert state["image"]["name"] == "second.png" and state["image"]["version"] == 2
    assert state["box"] is None and state["clicks"] == [] and not mask_of(state).any()
    assert (layer.size["width"], layer.size["height"]) == (160, 120)
