#!/usr/bin/env python
"""captioner web app: `python app.py [--host 127.0.0.1] [--port 7860] [--model PATH] [--share] [--device cpu]
[--backend onnx|torch|auto|compiled] [--int8]`.

Loads the model once (the packaged default unless --model), then serves the Gradio UI
(image, batch and video tabs; each is also an API endpoint, see captioner/app/ui.py).
Exit code 1 with one line on stderr when the model cannot be loaded.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from captioner.options import UsageError, add_backend_args, resolve_backend

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported anywhere


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="app.py", description="captioner web app (Gradio), offline.")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 = all)")
    p.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    p.add_argument("--model", type=Path, default=None,
                   help="a model bundle folder (`captioner export-onnx`) or a checkpoint (.pt); default: the model "
                        "shipped in the package")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default: cpu)")
    p.add_argument("--share", action="store_true", help="also open a public *.gradio.live link (off by default)")
    add_backend_args(p)
    args = p.parse_args(argv)
    try:
        resolve_backend(args)
    except UsageError as exc:
        p.error(str(exc))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from captioner.errors import CaptionerError
    from captioner.pipeline.load import load_captioner

    try:
        cap = load_captioner(args.model, args.device, backend=args.backend, int8=args.int8)
    except CaptionerError as exc:
        print(f"app.py: error: {exc}", file=sys.stderr)
        return 1
    except (RuntimeError, AssertionError) as exc:  # torch: unknown device, no CUDA driver, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        print(f"app.py: error: cannot use device {args.device!r}: {first}", file=sys.stderr)
        return 1
    from captioner.app import ui

    demo = ui.build_demo(cap)
    try:
        ui.launch(demo, host=args.host, port=args.port, share=args.share)
    except OSError as exc:  # port taken, address not available
        print(f"app.py: error: cannot serve on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
