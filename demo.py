"""An interactive demo in the browser: open an image, drag a box, click to correct, see the mask after each action.

    python demo.py --model checkpoints/pisam_vit_b            # then open http://127.0.0.1:7860/
    python demo.py --model checkpoints/sam_vit_b --port 8000

Left click adds to the mask (or removes, with the page's toggle), right click removes; undo, reset, open another
image, download the mask and the overlay. The image is encoded once; a click runs only the prompt path (SAM,
HQ-SAM: the points and the box's mask) or the interactor and the HR head (Pi-SAM). The page shows what the last
action cost. Several people can use one server: each browser tab has its own image and prompts, the model is
loaded once and serves one request at a time.

It works offline: the page is one self-contained file served by Python's standard library. It listens on this
machine only (127.0.0.1) unless --host says otherwise; opening files by path is then off unless --allow-paths.
User errors (a missing model, a port in use) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import sys
import threading


class UsageError(ValueError):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    from pisam_jax.cli import ArgumentParser

    p = ArgumentParser(prog="demo.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="model directory (SAM, HQ-SAM or Pi-SAM: python -m convert.sam|convert.hq_sam|convert.pisam)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (0: any free one; default 7860)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--allow-paths", action="store_true",
                   help="let visitors open image files on this machine by path also when --host is not local")
    p.add_argument("--hq-token-only", action="store_true", help="HQ-SAM models: the HQ token's mask alone")
    p.add_argument("--max-megapixels", type=float, default=40.0, help="largest image accepted (default 40)")
    p.add_argument("--max-upload-mb", type=float, default=200.0, help="largest upload accepted (default 200 MB)")
    p.add_argument("--max-sessions", type=int, default=8,
                   help="browser sessions kept (each holds its image's features); the oldest is forgotten")
    p.add_argument("--warmup-clicks", type=int, default=5,
                   help="at start, compile the box prompt and 1..N clicks, so that first clicks do not wait "
                        "(default 5; 0: compile on first use)")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: give a port in 0..65535")
    for flag in ("max_megapixels", "max_upload_mb", "max_sessions"):
        if not getattr(args, flag) > 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.warmup_clicks < 0:
        raise UsageError(f"--warmup-clicks must be 0 or more, got {args.warmup_clicks}")


def is_local(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(args: argparse.Namespace):
    """The server, listening (before the model loads: a port in use costs a second, not a model load)."""
    from pisam_jax.demo.server import DemoServer

    try:
        return DemoServer((args.host, args.port), max_upload_bytes=int(args.max_upload_mb * 2**20),
                          allow_paths=args.allow_paths or is_local(args.host))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UsageError(f"port {args.port} on {args.host} is in use (another demo?); pass --port N") from None
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); pass another --host or "
                         "--port") from None


def main(argv=None) -> int:
    from pisam_jax.models import ModelError, load_model, read_config

    args = parse_args(argv)
    try:
        check_args(args)
        config = read_config(args.model)
        if args.hq_token_only and config.decoder != "hq":
            raise UsageError(f"--hq-token-only needs an HQ-SAM model; {args.model} is {config.decoder!r}")
        server = bind(args)
    except (UsageError, ModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from pisam_jax.demo.sessions import Engine, Sessions
    from pisam_jax.evaluation.segmenter import model_name

    try:
        print(f"loading {args.model} ...", flush=True)
        engine = Engine(load_model(args.model), name=model_name(args.model), hq_token_only=args.hq_token_only)
        server.sessions = Sessions(engine, max_sessions=args.max_sessions,
                                   max_pixels=int(args.max_megapixels * 1e6))
        warm_up = threading.Thread(target=engine.warm_up, args=(args.warmup_clicks,),
                                   kwargs=dict(report=lambda line: print(f"warm-up: {line}", flush=True)),
                                   daemon=True)
        warm_up.start()
        print(f"serving {engine.name} on {server.url} (Ctrl+C stops)", flush=True)
        server.serve_forever()
    except ModelError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
