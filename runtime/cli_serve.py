"""`latentrt serve DIR`: an HTTP server over one pipeline (see latentrt.runtime.serve)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="engine folder (latentrt build) or ONNX export (latentrt export)")
    parser.add_argument("--backend", choices=("onnxruntime", "torch", "tensorrt"), default=None,
                        help="default: the folder's own backend")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--refiner", default=None, help="SDXL refiner engine folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)


def run(args: argparse.Namespace) -> int:
    from .pipeline import load_pipeline
    from .serve import serve

    pipeline = load_pipeline(args.folder, backend=args.backend, device=args.device, refiner=args.refiner)
    server = serve(pipeline, args.host, args.port)
    print(f"serving {pipeline.engines.spec.title} ({pipeline.engines.backend}) on {server.url} "
          "- GET /health, POST /generate; Ctrl-C stops", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        pipeline.close()
    return 0
