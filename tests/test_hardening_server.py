"""`latentrt serve` against hostile and clumsy clients: a real HTTP server on 127.0.0.1 over real ONNX Runtime
engines (tiny sd1), and real `latentrt serve` processes for signals.

Client errors are 4xx, never 500 (deep JSON, bomb images, huge prompts and bodies, requests beyond
memory); limits are configurable; a full queue is 503 with Retry-After (the queue is filled
deterministically by holding the pipeline's lock, not by timing); an API key guards every route but
/health; local paths stay on the server unless exposed; SIGTERM and SIGINT let the request in flight
finish, then the process exits 0.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from latentrt.runtime.pipeline import load_pipeline
from latentrt.runtime.serve import GenerationServer, ServerLimits, serve

REQUEST = {"prompt": "a red fox in the snow", "steps": 1, "guidance": 7.5, "width": 64, "height": 64, "seed": 7}


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height pixels in a few dozen bytes (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def start(pipe: object, limits: ServerLimits) -> GenerationServer:
    srv = serve(pipe, "127.0.0.1", 0, limits)  # type: ignore[arg-type]
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def stop(srv: GenerationServer) -> None:
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def sd1(onnx_export_dir: Callable[[str], Path]) -> Iterator[object]:
    pipe = load_pipeline(onnx_export_dir("sd1"), backend="onnxruntime")
    yield pipe
    pipe.close()


@pytest.fixture(scope="module")
def server(sd1: object) -> Iterator[GenerationServer]:
    srv = start(sd1, ServerLimits(max_body_bytes=1 << 20, max_prompt_chars=500, max_prompts=4,
                                  max_image_pixels=1 << 20))
    yield srv
    stop(srv)


def post(url: str, body: object, headers: dict[str, str] | None = None) -> tuple[int, bytes, dict[str, str]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, e.read(), dict(e.headers)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---------------------------------------------------------------------------- client errors are 4xx


def deep(levels: int) -> bytes:
    return b"[" * levels + b"]" * levels


CLIENT_ERRORS = {
    "deep JSON array (past the recursion limit)": (deep(100_000), 400, "nested too deeply"),
    "deep JSON value in a field": (json.dumps(dict(REQUEST, aspect=json.loads(deep(40)))).encode(), 400,
                                   "nested too deeply"),
    "deep JSON object": (b'{"a":' * 5000 + b"1" + b"}" * 5000, 400, "nested too deeply"),
    "bomb image 100000^2": (dict(REQUEST, image=b64(png_header_only(100_000, 100_000))), 413, "too large"),
    "bomb image 2048^2 over the limit": (dict(REQUEST, image=b64(png_header_only(2048, 2048))), 413, "too large"),
    "bomb mask": (dict(REQUEST, mask=b64(png_header_only(50_000, 50_000))), 413, "too large"),
    "huge prompt": (dict(REQUEST, prompt="fox " * 100_000), 413, "characters long"),
    "huge negative prompt": (dict(REQUEST, negative_prompt="x" * 501), 413, "characters long"),
    "many prompts": (dict(REQUEST, prompt=["a fox"] * 5), 413, "prompts"),
    "beyond memory": (dict(REQUEST, width=2048, height=2048, num_images_per_prompt=8), 413, "of memory"),
    "size 0": (dict(REQUEST, width=0), 400, "nearest valid: 64x64"),
    "negative steps": (dict(REQUEST, steps=-3), 400, "steps"),
    "huge seed": (dict(REQUEST, seed=10**30), 400, "seed"),
    "non-ASCII garbage": (b"\xff\xfe{", 400, "not valid JSON"),
    "a JSON list": (b"[1, 2]", 400, "JSON object"),
}


@pytest.mark.parametrize("case", list(CLIENT_ERRORS))
def test_client_errors_are_4xx(case: str, server: GenerationServer) -> None:
    body, status, needle = CLIENT_ERRORS[case]
    code, raw, _ = post(server.url + "/generate", body)
    answer = json.loads(raw)
    assert code == status and needle in answer["error"], answer


def test_the_memory_refusal_carries_the_estimate(server: GenerationServer) -> None:
    code, raw, _ = post(server.url + "/generate", dict(REQUEST, width=2048, height=2048, num_images_per_prompt=8))
    error = json.loads(raw)
    assert code == 413 and error["type"] == "TooLarge" and "GiB" in error["error"] and "try " in error["error"]


@pytest.mark.parametrize("length", [str(2 << 20), str(10**15)])
def test_bodies_over_the_limit_are_413_unread(server: GenerationServer, length: str) -> None:
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), int(port), timeout=60)
    try:
        conn.putrequest("POST", "/generate")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", length)
        conn.endheaders()  # no body sent: the server must answer from the header alone
        response = conn.getresponse()
        assert response.status == 413 and "at most 1048576" in json.loads(response.read())["error"]
    finally:
        conn.close()


def test_limits_are_configurable(sd1: object) -> None:
    srv = start(sd1, ServerLimits(max_prompt_chars=10, max_body_bytes=200))
    try:
        assert post(srv.url + "/generate", dict(REQUEST, prompt="a" * 10))[0] == 200
        assert post(srv.url + "/generate", dict(REQUEST, prompt="a" * 11))[0] == 413
        assert post(srv.url + "/generate", dict(REQUEST, prompt="a", negative_prompt=" " * 10,
                                                sampler="euler" + " " * 100))[0] == 413  # body over 200 bytes
    finally:
        stop(srv)


# ---------------------------------------------------------------------------- the queue


def _wait_for(predicate: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.mark.parametrize("max_queue", [0, 1])
def test_a_full_queue_is_503_with_retry_after(sd1: object, max_queue: int) -> None:
    srv = start(sd1, ServerLimits(max_queue=max_queue))
    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(post(srv.url + "/generate", REQUEST)[0]))
               for _ in range(max_queue + 1)]
    try:
        with srv.lock:  # the running request holds the pipeline: everything admitted waits
            for i, t in enumerate(threads):
                t.start()
                _wait_for(lambda i=i: srv.pending == i + 1, f"{i + 1} admitted request(s)")
            code, raw, headers = post(srv.url + "/generate", REQUEST)
            assert code == 503 and int(headers["Retry-After"]) >= 1 and "queue is full" in json.loads(raw)["error"]
            huge = dict(REQUEST, width=2048, height=2048, num_images_per_prompt=8)
            assert post(srv.url + "/generate", huge)[0] == 413  # refused up front, not queued
            assert post(srv.url + "/generate", dict(REQUEST, steps=0))[0] == 400
            status, health = get(srv.url + "/health")
            assert status == 200 and json.loads(health)["queue"] == max_queue + 1
        for t in threads:
            t.join(120)
        assert results == [200] * (max_queue + 1)
    finally:
        stop(srv)


# ---------------------------------------------------------------------------- API key and paths


def test_an_api_key_guards_every_route_but_health(sd1: object) -> None:
    srv = start(sd1, ServerLimits(api_key="s3cret"))
    try:
        assert post(srv.url + "/generate", REQUEST)[0] == 401
        code, _, headers = post(srv.url + "/generate", REQUEST, {"Authorization": "Bearer wrong"})
        assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer")
        assert post(srv.url + "/generate", REQUEST, {"X-API-Key": "s3cre"})[0] == 401
        assert get(srv.url + "/nope")[0] == 401
        assert post(srv.url + "/generate", REQUEST, {"Authorization": "Bearer s3cret"})[0] == 200
        assert post(srv.url + "/generate", REQUEST, {"X-API-Key": "s3cret"})[0] == 200
        assert get(srv.url + "/health")[0] == 200
    finally:
        stop(srv)


@pytest.fixture(scope="module")
def torch_pipe(tiny_checkpoint: Callable[[str], Path]) -> Iterator[object]:
    """A pipeline whose model is a local checkpoint folder (its path is what must not leak)."""
    pipe = load_pipeline(tiny_checkpoint("sd1"), backend="torch")
    yield pipe
    pipe.close()


@pytest.mark.parametrize("expose", [False, True])
def test_local_paths_stay_on_the_server_unless_exposed(torch_pipe: object, tiny_checkpoint: Callable[[str], Path],
                                                       expose: bool) -> None:
    folder = str(tiny_checkpoint("sd1"))
    srv = start(torch_pipe, ServerLimits(expose_paths=expose))
    try:
        code, raw, _ = post(srv.url + "/generate", REQUEST)
        assert code == 200
        body = json.loads(raw)
        png = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
        code, raw_png, _ = post(srv.url + "/generate?format=png", REQUEST)
        texts = [raw.decode(), json.dumps(getattr(png, "text", {})),
                 json.dumps(getattr(Image.open(io.BytesIO(raw_png)), "text", {})),
                 get(srv.url + "/health")[1].decode()]
        assert all((folder in t) == expose for t in texts)
        assert body["settings"]["model"] == (folder if expose else Path(folder).name)
    finally:
        stop(srv)


# ---------------------------------------------------------------------------- processes: warnings and signals


def _start_process(folder: Path, cwd: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "latentrt.cli", "serve", str(folder), "--port", "0", *extra],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "LATENTRT_API_KEY": ""})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert "serving" in line, line + (proc.stderr.read() if proc.stderr else "")
    url = line.split(" on ")[1].split()[0]
    return proc, url.replace("0.0.0.0", "127.0.0.1")


@pytest.mark.parametrize("signum, host", [(signal.SIGTERM, "0.0.0.0"), (signal.SIGINT, "127.0.0.1")])
def test_signals_drain_the_request_in_flight_then_exit_0(onnx_export_dir: Callable[[str], Path], tmp_path: Path,
                                                         signum: int, host: str) -> None:
    proc, url = _start_process(onnx_export_dir("sd1"), tmp_path, "--host", host, "--max-queue", "0",
                               "--max-prompt-chars", "30")
    answers: list[tuple[int, bytes, dict[str, str]]] = []
    slow = dict(REQUEST, steps=800)  # seconds on the tiny model: long enough to be in flight
    client = threading.Thread(target=lambda: answers.append(post(url + "/generate", slow)))
    try:
        client.start()
        _wait_for(lambda: json.loads(get(url + "/health")[1])["queue"] == 1, "the request to be in flight")
        assert post(url + "/generate", dict(REQUEST, prompt="x" * 31))[0] == 413  # the limits given apply
        assert post(url + "/generate", REQUEST)[0] == 503  # --max-queue 0: nothing waits behind the running one
        proc.send_signal(signum)
        client.join(300)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert answers and answers[0][0] == 200 and len(json.loads(answers[0][1])["images"]) == 1
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert "finishing 1 request(s) in flight" in err and "stopped" in out
    assert ("warning: listening on 0.0.0.0" in err) == (host == "0.0.0.0")
