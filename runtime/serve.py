"""A small HTTP server over one pipeline (standard library only).

Endpoints (JSON in, JSON out):
- ``GET  /health``    -> {"status": "ok", "family", "backend", "model"}
- ``POST /generate``  -> {"images": [base64 PNG, ...], "seed", "settings", "notes", "timing"}
  Body: the `GenerationRequest` fields that make sense over the wire (prompt, negative_prompt,
  steps, guidance, guidance_rescale, sampler, width, height, aspect, seed, num_images_per_prompt,
  strength, denoising_end, prompt_weighting, conditioning, step_cache, tiny_vae) plus optional base64 PNG
  ``image`` / ``mask``. A ``step_cache`` or ``tiny_vae`` the served engines were not exported for is a 400
  that names the export option.
  ``?format=png`` (or an ``Accept: image/png`` header) returns the first image as a PNG instead.
  ``conditioning`` holds values other than text by UNet input name, each a number or a list of
  numbers (one per prompt slot): ``{"class_labels": 3}`` for a class-conditional model, whose
  requests need no prompt (the family decides: one with a text encoder needs one).

Requests are served one at a time on the one pipeline (engines are not re-entrant); the timing
record is the same one the CLI and `latentrt bench` use.

Hardening (`ServerLimits`): client mistakes are 4xx, never 500 -- a body over the size limit, a
prompt over the length limit, an image over the pixel limit (checked from its header, before it is
decoded) and a request that needs more memory than is available are 413; JSON nested too deeply,
wrong types and bad settings are 400. At most `max_queue` requests wait behind the running one;
more get 503 with Retry-After. With an API key every route but /health needs
``Authorization: Bearer KEY`` (or ``X-API-Key: KEY``), else 401. Local paths (the engine folder,
a checkpoint path) are replaced by their last part in responses, errors and PNG metadata unless
`expose_paths` is set. `begin_drain` + `wait_idle` let in-flight requests finish on shutdown.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import logging
import math
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

from PIL import Image, UnidentifiedImageError

from latentrt.errors import InvalidRequest, LatentRTError, MissingComponent, TooLarge, UnsupportedShape

from .condition_values import is_condition_value
from .images import decoded, png_bytes
from .pipeline import GenerationRequest, GenerationResult, Pipeline

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 32 << 20
MAX_NAME_CHARS = 64  # a conditioning name (a UNet input name)
WIRE_TYPES = {  # field -> the JSON types it accepts ("str[]": a list of strings); null is always accepted
    "prompt": ("str", "str[]"), "negative_prompt": ("str", "str[]"), "sampler": ("str",),
    "steps": ("int",), "seed": ("int",), "width": ("int",), "height": ("int",), "num_images_per_prompt": ("int",),
    "guidance": ("number",), "strength": ("number",), "denoising_end": ("number",), "aspect": ("str", "number"),
    "guidance_rescale": ("number",), "prompt_weighting": ("bool",), "conditioning": ("object",),
    "step_cache": ("int",), "tiny_vae": ("bool",),
}
WIRE_FIELDS = set(WIRE_TYPES)


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of the server, and who may ask."""

    max_body_bytes: int = MAX_BODY_BYTES  # Content-Length above this: 413
    max_prompt_chars: int = 2000  # per prompt / negative prompt (~300 characters fill one 77-token window): 413
    max_prompts: int = 16  # prompts in one request, and values in one conditioning list: 413
    max_conditioning: int = 16  # names in the "conditioning" object: 413
    max_image_pixels: int = 4096 * 4096  # init image / mask, checked from the header before decoding: 413
    max_json_depth: int = 16  # nesting of the JSON body (a request needs 3): 400
    max_queue: int = 8  # requests waiting behind the running one; more: 503 + Retry-After
    request_timeout_s: float = 60.0  # a client that stalls mid-request is dropped
    api_key: str | None = None  # required as "Authorization: Bearer KEY" or "X-API-Key: KEY" when set
    expose_paths: bool = False  # keep local paths in responses and PNG metadata


def decode_image(value: Any, what: str, max_pixels: int = ServerLimits.max_image_pixels) -> Image.Image:
    """A PIL image from a base64 string (PNG/JPEG bytes); InvalidRequest when it is not one, TooLarge when its
    header declares more than `max_pixels`."""
    if not isinstance(value, str):
        raise InvalidRequest(f"'{what}' must be a base64-encoded image string")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the server's own limit applies
            im = Image.open(io.BytesIO(base64.b64decode(value, validate=True)))
        with im:
            return decoded(im, f"'{what}' image", max_pixels)
    except Image.DecompressionBombError as e:
        raise TooLarge(f"'{what}' is too large to decode safely: {e}") from None
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as e:
        raise InvalidRequest(f"'{what}' is not a readable base64 image: {e}") from None


def _is(value: Any, kind: str) -> bool:
    if kind == "str":
        return isinstance(value, str)
    if kind == "str[]":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "object":
        return isinstance(value, dict)
    if isinstance(value, bool):  # JSON true/false are not numbers
        return False
    return isinstance(value, int) if kind == "int" else isinstance(value, (int, float))


def check_types(body: dict[str, Any]) -> None:
    """InvalidRequest naming the first wire field whose JSON type is wrong (e.g. "steps": "20")."""
    names = {"str": "a string", "str[]": "a list of strings", "int": "an integer", "number": "a number",
             "bool": "true or false", "object": 'an object of input names to values, e.g. {"class_labels": 3}'}
    for key, kinds in WIRE_TYPES.items():
        value = body.get(key)
        if value is not None and not any(_is(value, k) for k in kinds):
            shown = json.dumps(value)
            raise InvalidRequest(f"'{key}' must be {' or '.join(names[k] for k in kinds)}, got "
                                 f"{shown if len(shown) <= 80 else shown[:77] + '...'}")


def check_prompts(body: dict[str, Any], limits: ServerLimits) -> None:
    """TooLarge when a prompt is longer, or there are more prompts, than the limits allow."""
    for key in ("prompt", "negative_prompt"):
        value = body.get(key)
        texts = [value] if isinstance(value, str) else value if isinstance(value, list) else []
        if len(texts) > limits.max_prompts:
            raise TooLarge(f"'{key}' holds {len(texts)} prompts; at most {limits.max_prompts} per request")
        longest = max((len(t) for t in texts), default=0)
        if longest > limits.max_prompt_chars:
            raise TooLarge(f"'{key}' is {longest} characters long; this server accepts at most "
                           f"{limits.max_prompt_chars} (latentrt serve --max-prompt-chars)")


def check_conditioning(body: dict[str, Any], limits: ServerLimits) -> None:
    """InvalidRequest unless 'conditioning' maps names to numbers or lists of numbers; TooLarge past the limits."""
    values = body.get("conditioning") or {}
    if len(values) > limits.max_conditioning:
        raise TooLarge(f"'conditioning' holds {len(values)} names; at most {limits.max_conditioning} per request")
    for name, value in values.items():
        if not name.isidentifier() or len(name) > MAX_NAME_CHARS:
            raise InvalidRequest(f"'conditioning' names UNet inputs (e.g. class_labels), got {name[:MAX_NAME_CHARS]!r}")
        if isinstance(value, list) and len(value) > limits.max_prompts:
            raise TooLarge(f"conditioning '{name}' holds {len(value)} values; at most {limits.max_prompts} per request")
        if not is_condition_value(value):
            shown = json.dumps(value)
            raise InvalidRequest(f"conditioning '{name}' must be a number or a non-empty list of numbers, got "
                                 f"{shown if len(shown) <= 80 else shown[:77] + '...'}")


def json_depth(value: Any) -> int:
    """Nesting depth of a decoded JSON value (iterative: no recursion on hostile input)."""
    depth, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            depth = max(depth, level)
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return depth


def request_from_json(body: dict[str, Any], limits: ServerLimits = ServerLimits()) -> GenerationRequest:
    """Validate the wire fields and build a `GenerationRequest` (whether a prompt is needed is the model's call)."""
    unknown = set(body) - WIRE_FIELDS - {"image", "mask"}
    if unknown:
        names = sorted(str(k)[:40] for k in unknown)[:5]
        raise InvalidRequest(f"unknown field(s) {', '.join(names)}; known: {', '.join(sorted(WIRE_FIELDS))}"
                             ", image, mask")
    check_types(body)
    check_prompts(body, limits)
    check_conditioning(body, limits)
    fields = {k: v for k, v in body.items() if k in WIRE_FIELDS and v is not None}  # null: the default
    for key in ("image", "mask"):
        if body.get(key) is not None:
            fields[key] = decode_image(body[key], key, limits.max_image_pixels)
    return GenerationRequest(**fields)


def check_prompt_given(request: GenerationRequest, pipeline: Pipeline) -> None:
    """InvalidRequest in the wire's words when a model conditioned on text gets no prompt (others need none)."""
    if request.prompt is None and pipeline.spec.text_encoders and pipeline.spec.image_encoder is None:  # unCLIP: ""
        raise InvalidRequest(f"the request needs a 'prompt': {pipeline.spec.name} is conditioned on text")


def result_to_json(result: GenerationResult) -> dict[str, Any]:
    images = [base64.b64encode(png_bytes(im, result.metadata(i))).decode() for i, im in enumerate(result.images)]
    return {"images": images, "seed": result.seed, "settings": result.settings, "notes": result.notes,
            "timing": result.timing.to_json()}


def is_local_path(text: Any) -> bool:
    """Whether a model reference is a path on this machine (not tiny:<family> or a hub id)."""
    if not isinstance(text, str) or not text or text.startswith("tiny:"):
        return False
    return os.path.isabs(text) or text.startswith((".", "~")) or os.path.exists(text)


class GenerationServer(ThreadingHTTPServer):
    """An HTTP server bound to one pipeline; requests are run one at a time, at most `max_queue` waiting."""

    daemon_threads = True

    def __init__(self, pipeline: Pipeline, host: str = "127.0.0.1", port: int = 8080,
                 limits: ServerLimits | None = None):
        super().__init__((host, port), _Handler)
        self.pipeline = pipeline
        self.limits = limits or ServerLimits()
        self.lock = threading.Lock()  # the pipeline runs one request at a time
        self.state = threading.Condition()  # guards `pending` and `draining`
        self.pending = 0  # requests admitted (running or waiting)
        self.draining = False
        self.last_seconds = 1.0  # duration of the last generation, for Retry-After

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A connection that fails (a client hanging up, a timeout) is logged in one line, not a traceback."""
        log.warning("connection from %s failed: %s", client_address[0] if client_address else "?",
                    sys.exc_info()[1])

    # -------------------------------------------------------------- admission and draining

    def admit(self) -> bool:
        """Take a queue slot; False when the queue is full or the server is draining."""
        with self.state:
            if self.draining or self.pending > self.limits.max_queue:
                return False
            self.pending += 1
            return True

    def release(self) -> None:
        with self.state:
            self.pending -= 1
            self.state.notify_all()

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free (the queue ahead times the last request's duration)."""
        with self.state:
            return max(1, math.ceil(self.last_seconds * max(1, self.pending - self.limits.max_queue)))

    def begin_drain(self) -> None:
        """Refuse new requests (503); those admitted run to completion."""
        with self.state:
            self.draining = True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no admitted request is left; False on timeout."""
        with self.state:
            return self.state.wait_for(lambda: self.pending == 0, timeout)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        with self.lock:
            start = time.perf_counter()
            try:
                return self.pipeline.generate(request)
            finally:
                self.last_seconds = time.perf_counter() - start

    # -------------------------------------------------------------- paths

    def local_paths(self) -> list[str]:
        """Local path strings that must not leave the server (longest first)."""
        pipes = [self.pipeline] + ([self.pipeline.refiner] if self.pipeline.refiner is not None else [])
        found: set[str] = set()
        for p in pipes:
            for path in (p.engines.folder, p.engines.source.get("model")):
                if path is not None and (isinstance(path, Path) or is_local_path(path)):
                    found.update({str(path), str(Path(path).resolve()), str(Path(path).absolute())})
        return sorted((f for f in found if len(f) > 1), key=len, reverse=True)

    def redact(self, text: str) -> str:
        """`text` with local paths replaced by their last part (unless paths are exposed)."""
        if self.limits.expose_paths:
            return text
        for path in self.local_paths():
            text = text.replace(path, Path(path).name or "<path>")
        return text

    def public(self, result: GenerationResult) -> GenerationResult:
        """The result with local model paths in its settings (and so its PNG metadata) reduced to their names."""
        if self.limits.expose_paths:
            return result
        settings = dict(result.settings)
        for key in ("model", "refiner"):
            if is_local_path(settings.get(key)):
                settings[key] = Path(str(settings[key])).name
        return replace(result, settings=settings, notes=[self.redact(n) for n in result.notes])


class _Handler(BaseHTTPRequestHandler):
    server: GenerationServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.limits.request_timeout_s)  # a stalled client is dropped

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (BaseHTTPRequestHandler's name)
        log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.server.draining:
            self.close_connection = True
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: HTTPStatus, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj, default=str).encode(), "application/json", headers)

    def _error(self, status: HTTPStatus, message: str, kind: str, headers: dict[str, str] | None = None) -> None:
        self._json(status, {"error": self.server.redact(message), "type": kind}, headers)

    def _authorized(self) -> bool:
        key = self.server.limits.api_key
        if not key:
            return True
        auth = self.headers.get("Authorization", "")
        given = auth[7:].strip() if auth.lower().startswith("bearer ") else self.headers.get("X-API-Key", "")
        if hmac.compare_digest(given.encode(), key.encode()):
            return True
        self.close_connection = True  # the body (if any) is left unread
        self._error(HTTPStatus.UNAUTHORIZED, "an API key is required: send 'Authorization: Bearer KEY'",
                    "Unauthorized", {"WWW-Authenticate": 'Bearer realm="latentrt"'})
        return False

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        if urlparse(self.path).path != "/health":
            if self._authorized():
                self._error(HTTPStatus.NOT_FOUND, "no such route; try GET /health, POST /generate", "NotFound")
            return
        es = self.server.pipeline.engines
        model = es.source.get("model")
        if is_local_path(model) and not self.server.limits.expose_paths:
            model = Path(str(model)).name
        self._json(HTTPStatus.OK, {"status": "draining" if self.server.draining else "ok", "family": es.spec.name,
                                   "backend": es.backend, "model": model, "queue": self.server.pending})

    def do_POST(self) -> None:  # noqa: N802
        if not self._authorized():
            return
        url = urlparse(self.path)
        if url.path != "/generate":
            self.close_connection = True  # the body is left unread
            self._error(HTTPStatus.NOT_FOUND, f"no route POST {url.path[:100]}; try POST /generate", "NotFound")
            return
        try:
            body = self._read_json()
            request = request_from_json(body, self.server.limits)
            check_prompt_given(request, self.server.pipeline)
            self.server.pipeline.check(request)  # bad settings and requests beyond memory never wait in the queue
        except MissingComponent as e:  # an option (step_cache, tiny_vae) these engines lack: the client's to drop
            self._client_error(InvalidRequest(str(e)))
            return
        except LatentRTError as e:
            self._client_error(e)
            return
        if not self.server.admit():
            self.close_connection = True
            why = "the server is shutting down" if self.server.draining else \
                f"the queue is full ({self.server.limits.max_queue} waiting)"
            self._error(HTTPStatus.SERVICE_UNAVAILABLE, f"{why}; retry later", "Busy",
                        {"Retry-After": str(self.server.retry_after())})
            return
        try:
            self._generate(request, url.query)
        finally:
            self.server.release()

    def _generate(self, request: GenerationRequest, query: str) -> None:
        try:
            result = self.server.public(self.server.generate(request))
        except LatentRTError as e:
            self._client_error(e)
            return
        except Exception as e:  # an engine failure is a server error, reported, not a dropped connection
            log.exception("generation failed")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(e).__name__}: {e}", "InternalError")
            return
        wants_png = parse_qs(query).get("format") == ["png"] or "image/png" in self.headers.get("Accept", "")
        if wants_png:
            self._send(HTTPStatus.OK, png_bytes(result.images[0], result.metadata(0)), "image/png")
        else:
            self._json(HTTPStatus.OK, result_to_json(result))

    def _client_error(self, e: LatentRTError) -> None:
        """413 for limits, 400 for invalid requests, 500 for server-side artifact problems."""
        if isinstance(e, TooLarge):
            status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE
        elif isinstance(e, (InvalidRequest, UnsupportedShape)):
            status = HTTPStatus.BAD_REQUEST
        else:
            log.error("request failed: %s", e)
            status = HTTPStatus.INTERNAL_SERVER_ERROR
        self._error(status, str(e), type(e).__name__)

    def _read_json(self) -> dict[str, Any]:
        limit = self.server.limits.max_body_bytes
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self.close_connection = True  # the body's end is unknown: this connection cannot be reused
            raise InvalidRequest(f"Content-Length must be a number of bytes, got "
                                 f"{self.headers.get('Content-Length')!r:.40}") from None
        if length > limit:
            self.close_connection = True  # the body is left unread
            raise TooLarge(f"the body is {length} bytes; at most {limit} ({limit / (1 << 20):.0f} MiB) are accepted")
        if length <= 0:
            self.close_connection = True  # the body (if any) is left unread
            raise InvalidRequest(f"a JSON body of 1 byte to {limit >> 20} MiB with a Content-Length is required")
        try:
            raw = self.rfile.read(length)
        except OSError:  # a client that stalls past the timeout or hangs up mid-body
            self.close_connection = True
            raise InvalidRequest(f"the body ended before its Content-Length ({length} bytes)") from None
        if len(raw) < length:
            self.close_connection = True
            raise InvalidRequest(f"the body ended before its Content-Length ({len(raw)} of {length} bytes)")
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidRequest(f"the body is not valid JSON: {e}") from None
        except RecursionError:
            raise InvalidRequest(f"the JSON body is nested too deeply (at most {self.server.limits.max_json_depth} "
                                 "levels)") from None
        if json_depth(body) > self.server.limits.max_json_depth:
            raise InvalidRequest(f"the JSON body is nested too deeply (at most {self.server.limits.max_json_depth} "
                                 "levels)")
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be a JSON object")
        return body


def serve(pipeline: Pipeline, host: str = "127.0.0.1", port: int = 8080,
          limits: ServerLimits | None = None) -> GenerationServer:
    """A server bound to host:port (port 0 picks a free one); call `serve_forever()` on it."""
    return GenerationServer(pipeline, host, port, limits)
