"""A small HTTP server over one pipeline (standard library only).

Endpoints (JSON in, JSON out):
- ``GET  /health``    -> {"status": "ok", "family", "backend", "model"}
- ``POST /generate``  -> {"images": [base64 PNG, ...], "seed", "settings", "notes", "timing"}
  Body: the `GenerationRequest` fields that make sense over the wire (prompt, negative_prompt,
  steps, guidance, guidance_rescale, sampler, width, height, aspect, seed, num_images_per_prompt,
  strength, denoising_end, prompt_weighting) plus optional base64 PNG ``image`` / ``mask``. ``?format=png`` (or an
  ``Accept: image/png`` header) returns the first image as a PNG instead.

Requests are served one at a time on the one pipeline (engines are not re-entrant); the timing
record is the same one the CLI and `latentrt bench` use.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlparse

from PIL import Image, UnidentifiedImageError

from latentrt.errors import InvalidRequest, LatentRTError

from .images import png_bytes
from .pipeline import GenerationRequest, GenerationResult, Pipeline

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20
WIRE_TYPES = {  # field -> the JSON types it accepts ("str[]": a list of strings); null is always accepted
    "prompt": ("str", "str[]"), "negative_prompt": ("str", "str[]"), "sampler": ("str",),
    "steps": ("int",), "seed": ("int",), "width": ("int",), "height": ("int",), "num_images_per_prompt": ("int",),
    "guidance": ("number",), "strength": ("number",), "denoising_end": ("number",), "aspect": ("str", "number"),
    "guidance_rescale": ("number",), "prompt_weighting": ("bool",),
}
WIRE_FIELDS = set(WIRE_TYPES)


def decode_image(value: Any, what: str) -> Image.Image:
    """A PIL image from a base64 string (PNG/JPEG bytes); InvalidRequest when it is not one."""
    if not isinstance(value, str):
        raise InvalidRequest(f"'{what}' must be a base64-encoded image string")
    try:
        with Image.open(io.BytesIO(base64.b64decode(value, validate=True))) as im:
            im.load()
            return im.copy()
    except (binascii.Error, UnidentifiedImageError, OSError) as e:
        raise InvalidRequest(f"'{what}' is not a readable base64 image: {e}") from None


def _is(value: Any, kind: str) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "str[]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):  # JSON true/false are not numbers
        return False
    return isinstance(value, int) if kind == "int" else isinstance(value, (int, float))


def check_types(body: dict[str, Any]) -> None:
    """InvalidRequest naming the first wire field whose JSON type is wrong (e.g. "steps": "20")."""
    names = {"str": "a string", "str[]": "a list of strings", "int": "an integer", "number": "a number",
             "bool": "true or false"}
    for key, kinds in WIRE_TYPES.items():
        value = body.get(key)
        if value is not None and not any(_is(value, k) for k in kinds):
            raise InvalidRequest(f"'{key}' must be {' or '.join(names[k] for k in kinds)}, got {json.dumps(value)}")


def request_from_json(body: dict[str, Any]) -> GenerationRequest:
    """Validate the wire fields and build a `GenerationRequest`."""
    if body.get("prompt") is None:
        raise InvalidRequest("the request needs a 'prompt'")
    unknown = set(body) - WIRE_FIELDS - {"image", "mask"}
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(WIRE_FIELDS))}"
                             ", image, mask")
    check_types(body)
    fields = {k: v for k, v in body.items() if k in WIRE_FIELDS and v is not None}  # null: the default
    for key in ("image", "mask"):
        if body.get(key) is not None:
            fields[key] = decode_image(body[key], key)
    return GenerationRequest(**fields)


def result_to_json(result: GenerationResult) -> dict[str, Any]:
    images = [base64.b64encode(png_bytes(im, result.metadata(i))).decode() for i, im in enumerate(result.images)]
    return {"images": images, "seed": result.seed, "settings": result.settings, "notes": result.notes,
            "timing": result.timing.to_json()}


class GenerationServer(ThreadingHTTPServer):
    """An HTTP server bound to one pipeline; requests are run one at a time."""

    daemon_threads = True

    def __init__(self, pipeline: Pipeline, host: str = "127.0.0.1", port: int = 8080):
        super().__init__((host, port), _Handler)
        self.pipeline = pipeline
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def generate(self, request: GenerationRequest) -> GenerationResult:
        with self.lock:
            return self.pipeline.generate(request)


class _Handler(BaseHTTPRequestHandler):
    server: GenerationServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (BaseHTTPRequestHandler's name)
        log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, obj: Any) -> None:
        self._send(status, json.dumps(obj, default=str).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if urlparse(self.path).path != "/health":
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no route GET {self.path}; try GET /health, POST /generate"})
            return
        es = self.server.pipeline.engines
        self._json(HTTPStatus.OK, {"status": "ok", "family": es.spec.id.value, "backend": es.backend,
                                   "model": es.source.get("model")})

    def do_POST(self) -> None:  # noqa: N802
        url = urlparse(self.path)
        if url.path != "/generate":
            self._json(HTTPStatus.NOT_FOUND, {"error": f"no route POST {url.path}; try POST /generate"})
            return
        try:
            request = request_from_json(self._read_json())
            result = self.server.generate(request)
        except LatentRTError as e:
            self._json(HTTPStatus.BAD_REQUEST, {"error": str(e), "type": type(e).__name__})
            return
        except Exception as e:  # an engine failure is a server error, reported, not a dropped connection
            log.exception("generation failed")
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"{type(e).__name__}: {e}"})
            return
        wants_png = parse_qs(url.query).get("format") == ["png"] or "image/png" in self.headers.get("Accept", "")
        if wants_png:
            self._send(HTTPStatus.OK, png_bytes(result.images[0], result.metadata(0)), "image/png")
        else:
            self._json(HTTPStatus.OK, result_to_json(result))

    def _read_json(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True  # the body's end is unknown: this connection cannot be reused
            raise InvalidRequest(f"Content-Length must be a number of bytes, got "
                                 f"{self.headers.get('Content-Length')!r}") from None
        if length <= 0 or length > MAX_BODY_BYTES:
            self.close_connection = True  # the body (if any) is left unread
            raise InvalidRequest(f"a JSON body of 1 byte to {MAX_BODY_BYTES >> 20} MiB is required")
        try:
            body = json.loads(self.rfile.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidRequest(f"the body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object")
        return body


def serve(pipeline: Pipeline, host: str = "127.0.0.1", port: int = 8080) -> GenerationServer:
    """A server bound to host:port (port 0 picks a free one); call `serve_forever()` on it."""
    return GenerationServer(pipeline, host, port)
