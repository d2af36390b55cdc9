"""The demo's latency per action, measured in the browser; one JSON line per kind of action.

    python -m bench.demo --model checkpoints/pisam_vit_b [--image photo.jpg] [--clicks 8]

Serves demo.py's page from this process (after the same warm-up, so compilation is not timed), opens it in
headless Chromium (Debian's chromium and chromium-driver, driven by Selenium), opens the image, drags a box, clicks
``--clicks`` times inside it (foreground and background in turn, left and right button), undoes them all, and
drags a second box (the first one on an image of a new size also compiles the resize back to it).
For every action it reads the page's own measure, from the request leaving to the mask painted
(``window.demo.lastLatency``: ``browser_ms``), and the server's share of it (``server_ms``: the model, waiting for
it included; ``compile_ms``: compiling, within it). Prints the median and the maximum per kind of action.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
from pathlib import Path

import numpy as np


def emit(**kw):
    print(json.dumps(kw), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--image", help="image file (default: a smooth random 1280x960 picture)")
    p.add_argument("--clicks", type=int, default=8)
    args = p.parse_args(argv)

    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from pisam_jax.demo.server import DemoServer
    from pisam_jax.demo.sessions import Engine, Sessions
    from pisam_jax.evaluation.segmenter import model_name
    from pisam_jax.models import load_model

    work = Path(tempfile.mkdtemp(prefix="pisam-bench-demo-"))
    image = args.image
    if image is None:
        small = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = work / "picture.png"
        Image.fromarray(small).resize((1280, 960), Image.BICUBIC).save(image)
    engine = Engine(load_model(args.model), name=model_name(args.model))
    engine.warm_up(args.clicks, report=lambda line: None)
    server = DemoServer(("127.0.0.1", 0), Sessions(engine), max_upload_bytes=2**30, allow_paths=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1100", f"--user-data-dir={work / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    times: dict[str, list] = {}
    try:
        driver.get(server.url)
        wait = WebDriverWait(driver, 600, poll_frequency=0.02)
        wait.until(lambda d: d.execute_script("return window.demo.ready === true"))

        def record():
            wait.until(lambda d: d.execute_script("return window.demo.busy === 0"))
            last = driver.execute_script("return window.demo.lastLatency")
            error = driver.execute_script("return document.getElementById('message').className === 'error'")
            if error:
                raise SystemExit(f"the page reports: {driver.find_element(By.ID, 'message').text}")
            times.setdefault(last["action"], []).append(
                (last["browser_ms"], last["server"]["ms"], last["server"]["compile_ms"]))

        driver.find_element(By.ID, "file").send_keys(str(Path(image).resolve()))
        record()
        layer = driver.find_element(By.ID, "prompt-layer")
        w, h = layer.size["width"], layer.size["height"]
        def drag_box(shrink):
            ActionChains(driver).move_to_element_with_offset(layer, -w // shrink, -h // shrink).click_and_hold() \
                .move_by_offset(w // shrink, h // shrink).move_by_offset(w // shrink, h // shrink).release().perform()
            record()

        drag_box(4)
        rng = np.random.default_rng(1)
        for i in range(args.clicks):
            dx, dy = (rng.uniform(-0.2, 0.2, 2) * (w, h)).astype(int)
            chain = ActionChains(driver).move_to_element_with_offset(layer, int(dx), int(dy))
            (chain.click() if i % 2 == 0 else chain.context_click()).perform()
            record()
        for _ in range(args.clicks):
            driver.find_element(By.ID, "undo").click()
            record()
        drag_box(3)
    finally:
        driver.quit()
        server.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    c = engine.config
    for action, pairs in times.items():
        browser, model, compiling = np.array(pairs).T
        emit(model=engine.name, decoder=engine.decoder, model_type=c.model_type, action=action, n=len(pairs),
             browser_ms_median=round(float(np.median(browser)), 1), browser_ms_max=round(float(browser.max()), 1),
             server_ms_median=round(float(np.median(model)), 1), compile_ms_max=round(float(compiling.max()), 1),
             browser_ms=[round(float(v)) for v in browser], compile_ms=[round(float(v)) for v in compiling])


if __name__ == "__main__":
    main()
