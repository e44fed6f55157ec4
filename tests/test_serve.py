"""`latentrt serve`: a real HTTP server on 127.0.0.1 over a real ONNX Runtime pipeline (tiny SD 1.x)."""

from __future__ import annotations

import base64
import io
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latentrt.runtime.pipeline import GenerationRequest, load_pipeline
from latentrt.runtime.serve import GenerationServer, serve


@pytest.fixture(scope="module")
def server(onnx_export_dir: Callable[[str], Path]) -> Iterator[GenerationServer]:
    pipe = load_pipeline(onnx_export_dir("sd1"), backend="onnxruntime")
    srv = serve(pipe, "127.0.0.1", 0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    pipe.close()


def _post(url: str, body: object, headers: dict[str, str] | None = None) -> tuple[int, bytes, str]:
    data = json.dumps(body).encode() if not isinstance(body, bytes) else body
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


REQUEST = {"prompt": "a red fox in the snow", "steps": 2, "guidance": 7.5, "width": 64, "height": 64, "seed": 7}


def test_health(server: GenerationServer) -> None:
    with urllib.request.urlopen(server.url + "/health", timeout=30) as r:
        body = json.loads(r.read())
    assert body["status"] == "ok" and body["family"] == "sd1" and body["backend"] == "onnxruntime"


def test_generate_matches_the_python_api(server: GenerationServer) -> None:
    status, raw, ctype = _post(server.url + "/generate", REQUEST)
    assert status == 200 and ctype == "application/json"
    body = json.loads(raw)
    assert body["seed"] == 7 and len(body["images"]) == 1
    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert image.size == (64, 64) and image.text["seed"] == "7" and image.text["prompt"] == REQUEST["prompt"]
    assert body["timing"]["summary"]["unet"]["count"] == 2
    direct = server.pipeline.generate(GenerationRequest(**REQUEST))  # type: ignore[arg-type]
    assert np.array_equal(np.asarray(image.convert("RGB")), np.asarray(direct.images[0]))


def test_generate_png(server: GenerationServer) -> None:
    status, raw, ctype = _post(server.url + "/generate?format=png", REQUEST)
    assert status == 200 and ctype == "image/png"
    assert Image.open(io.BytesIO(raw)).size == (64, 64)


@pytest.mark.parametrize("body, needle", [
    ({"steps": 2}, "prompt"),
    (dict(REQUEST, steps=0), "steps"),
    (dict(REQUEST, width=100), "multiple of 64"),
    (dict(REQUEST, colour="red"), "unknown field"),
    (dict(REQUEST, image="not base64!"), "base64"),
    (b"{not json", "not valid JSON"),
    (dict(REQUEST, steps="abc"), "'steps' must be an integer"),
    (dict(REQUEST, steps=2.5), "'steps' must be an integer"),
    (dict(REQUEST, num_images_per_prompt="2"), "'num_images_per_prompt' must be an integer"),
    (dict(REQUEST, guidance="x"), "'guidance' must be a number"),
    (dict(REQUEST, guidance=True), "'guidance' must be a number"),
    (dict(REQUEST, seed=False), "'seed' must be an integer"),
    (dict(REQUEST, prompt=["a", 3]), "'prompt' must be a string or a list of strings"),
    (dict(REQUEST, prompt=None), "needs a 'prompt'"),
    (dict(REQUEST, aspect=[16, 9]), "'aspect' must be a string or a number"),
    (dict(REQUEST, sampler=1), "'sampler' must be a string"),
    (dict(REQUEST, tiny_vae="yes"), "'tiny_vae' must be true or false"),
    (dict(REQUEST, step_cache=1.5), "'step_cache' must be an integer"),
    (dict(REQUEST, tiny_vae=True), "--tiny-vae"),  # options the served export lacks are the client's to drop
    (dict(REQUEST, step_cache=2), "--step-cache"),
])
def test_bad_requests_get_400_with_a_message(server: GenerationServer, body: object, needle: str) -> None:
    status, raw, _ = _post(server.url + "/generate", body)
    assert status == 400
    assert needle in json.loads(raw)["error"]


def test_null_fields_take_the_defaults(server: GenerationServer) -> None:
    status, raw, _ = _post(server.url + "/generate", dict(REQUEST, num_images_per_prompt=None, sampler=None))
    assert status == 200 and len(json.loads(raw)["images"]) == 1


def test_non_numeric_content_length_is_400(server: GenerationServer) -> None:
    import http.client

    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=60)
    try:
        conn.putrequest("POST", "/generate")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", "lots")
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 400 and "Content-Length must be a number" in json.loads(response.read())["error"]
    finally:
        conn.close()


def test_unknown_route_is_404(server: GenerationServer) -> None:
    status, raw, _ = _post(server.url + "/nope", REQUEST)
    assert status == 404 and "POST /generate" in json.loads(raw)["error"]
