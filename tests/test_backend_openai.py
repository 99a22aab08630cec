"""The openai backend against the fake OpenAI-compatible server (real HTTP on loopback).

Every wait is bounded: the backend's ``timeout_s`` is short, and each server-side record
is awaited with a timeout.
"""

from __future__ import annotations

import base64
import queue
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest

from robix_planner.backends import load_backend
from robix_planner.backends.base import BackendError, ChatMessage, ImagePart, ModelConfig
from robix_planner.backends.fake_openai_server import FakeOpenAIServer
from robix_planner.backends.openai_compat import OpenAIBackend
from robix_planner.backends.scripted import split_chunks
from robix_planner.config import ConfigError

REPLY = ("<|think_start|>The red cup is on the table and the gripper is empty.<|think_end|>"
         "<|plan_start|>put the red cup into the bus tub<|plan_end|>"
         "<|response_start|>Clearing the table now.<|response_end|>")


def image(seed: int, h: int = 24, w: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def prompt(*user_parts) -> list[ChatMessage]:
    return [
        ChatMessage("system", ("You are a robot that clears tables.",)),
        ChatMessage("user", user_parts or ("clear the table",)),
    ]


def config(server: FakeOpenAIServer, **kw) -> ModelConfig:
    return ModelConfig(**{"backend": "openai", "base_url": server.base_url, "model": "robix-test", "timeout_s": 5.0,
                          **kw})


@pytest.fixture
def server():
    with FakeOpenAIServer([REPLY]) as srv:
        yield srv


def stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "openai-stream"]


def decode_data_url(url: str) -> np.ndarray:
    head, _, data = url.partition(",")
    assert head == "data:image/png;base64"
    bgr = cv2.imdecode(np.frombuffer(base64.b64decode(data), np.uint8), cv2.IMREAD_COLOR)
    return bgr[:, :, ::-1]


def test_streamed_text_equals_the_servers_reply(server):
    backend = load_backend(config(server))
    assert isinstance(backend, OpenAIBackend)
    deltas = list(backend.generate(prompt(), cancel=threading.Event()))
    assert "".join(deltas) == REPLY
    assert len(deltas) == len(split_chunks(REPLY))  # streamed piece by piece, not in one block
    stats = backend.last_stats
    assert stats.new_tokens == len(deltas) and stats.prompt_tokens > 0 and stats.cached_tokens == 0
    assert stats.extra["finish_reason"] == "stop" and not stats.cancelled
    # The same prompt again: the server's prefix cache count reaches the client.
    list(backend.generate(prompt(), cancel=threading.Event()))
    assert backend.last_stats.cached_tokens == backend.last_stats.prompt_tokens > 0
    assert not stream_threads()


def test_images_arrive_as_png_data_urls_in_order(server):
    head, wrist = image(1), image(2, 16, 20)
    backend = OpenAIBackend(config(server))
    list(backend.generate(prompt("views:", ImagePart(head), ImagePart(wrist, "left_wrist"), "clear the table"),
                          cancel=threading.Event()))
    request = server.wait_for_requests(1)[0]
    user = request.body["messages"][1]
    assert [p["type"] for p in user["content"]] == ["text", "image_url", "image_url", "text"]
    assert user["content"][0]["text"] == "views:" and user["content"][3]["text"] == "clear the table"
    sent = [decode_data_url(url) for url in request.image_urls]
    np.testing.assert_array_equal(sent[0], head)  # lossless, and still RGB
    np.testing.assert_array_equal(sent[1], wrist)
    assert request.body["messages"][0] == {"role": "system", "content": "You are a robot that clears tables."}


def test_a_non_rgb_image_is_refused_before_anything_is_sent(server):
    backend = OpenAIBackend(config(server))
    with pytest.raises(BackendError, match=r"\(H, W, 3\) uint8"):
        list(backend.generate(prompt(ImagePart(np.zeros((8, 8), np.float32))), cancel=threading.Event()))
    assert server.requests == []


def test_sampling_parameters_and_model_are_passed_through(server):
    backend = OpenAIBackend(config(server, temperature=0.7, top_p=0.9, max_new_tokens=5, seed=42))
    text = "".join(backend.generate(prompt(), cancel=threading.Event()))
    body = server.wait_for_requests(1)[0].body
    assert {k: body[k] for k in ("model", "stream", "temperature", "top_p", "max_tokens", "seed")} == {
        "model": "robix-test", "stream": True, "temperature": 0.7, "top_p": 0.9, "max_tokens": 5, "seed": 42}
    assert text == "".join(split_chunks(REPLY)[:5])  # the server honoured max_tokens ...
    assert backend.last_stats.extra["finish_reason"] == "length"  # ... and the client saw why it stopped


def test_cancel_mid_stream_stops_within_one_chunk_and_the_server_sees_the_disconnect():
    with FakeOpenAIServer([REPLY], chunk_delay_s=0.05) as server:
        backend = OpenAIBackend(config(server))
        cancel = threading.Event()
        got = []
        for delta in backend.generate(prompt(), cancel=cancel):
            got.append(delta)
            if len(got) == 3:
                cancel.set()
        assert len(got) == 3 and backend.last_stats.cancelled
        request = server.wait_for_requests(1)[0]
        assert request.wait(5.0)
        assert request.disconnected and not request.completed
        assert request.chunks_sent <= len(got) + 1  # the server stopped generating within one chunk
        assert request.chunks_sent < len(split_chunks(REPLY))


def test_cancel_while_waiting_for_a_slow_chunk_returns_at_once():
    with FakeOpenAIServer([REPLY], chunk_delay_s=3.0) as server:
        backend = OpenAIBackend(config(server))
        cancel = threading.Event()
        stream = backend.generate(prompt(), cancel=cancel)
        assert next(stream) == "<|think_start|>"
        timer = threading.Timer(0.1, cancel.set)
        timer.start()
        t0 = time.monotonic()
        assert list(stream) == []
        assert time.monotonic() - t0 < 1.5  # not the 3 s until the next chunk, nor the 5 s timeout
        timer.join()
        request = server.wait_for_requests(1)[0]
        assert request.wait(5.0) and request.disconnected and request.chunks_sent == 1


def test_a_generation_cancelled_before_it_starts_sends_nothing(server):
    cancel = threading.Event()
    cancel.set()
    backend = OpenAIBackend(config(server))
    assert list(backend.generate(prompt(), cancel=cancel)) == []
    assert backend.last_stats.cancelled and server.requests == []


def test_dropping_the_stream_closes_the_request(server):
    server.chunk_delay_s = 0.05
    backend = OpenAIBackend(config(server))
    stream = backend.generate(prompt(), cancel=threading.Event())
    next(stream)
    stream.close()  # the consumer walks away without setting cancel
    request = server.wait_for_requests(1)[0]
    assert request.wait(5.0) and request.disconnected
    deadline = time.monotonic() + 2.0
    while stream_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not stream_threads()


@pytest.mark.parametrize("error, expected", [
    ((400, "This model's maximum context length is 4096 tokens."), r"HTTP 400: This model's maximum context length"),
    ((503, "engine is overloaded"), r"HTTP 503: engine is overloaded.*server's log"),
])
def test_server_errors_carry_the_servers_message(server, error, expected):
    server.error = error
    with pytest.raises(BackendError, match=expected):
        list(OpenAIBackend(config(server)).generate(prompt(), cancel=threading.Event()))


def test_unknown_model_names_the_setting_to_check():
    with FakeOpenAIServer([REPLY], model="robix-7b") as server:
        with pytest.raises(BackendError, match=r"HTTP 404: The model `robix-test` does not exist.*model.model"):
            list(OpenAIBackend(config(server)).generate(prompt(), cancel=threading.Event()))


def test_an_oversized_request_is_refused_by_the_server():
    with FakeOpenAIServer([REPLY], max_request_bytes=2000) as server:
        with pytest.raises(BackendError, match=r"HTTP 413.*too large"):
            list(OpenAIBackend(config(server)).generate(prompt(ImagePart(image(3, 64, 64))), cancel=threading.Event()))
        assert server.wait_for_requests(1)[0].status == 413


def test_connection_refused_says_to_check_the_server():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = OpenAIBackend(ModelConfig(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", model="m"))
    with pytest.raises(BackendError, match="connection refused.*model.base_url"):
        list(backend.generate(prompt(), cancel=threading.Event()))


def test_a_stalled_server_times_out_within_timeout_s():
    with FakeOpenAIServer([REPLY], chunk_delay_s=10.0) as server:
        backend = OpenAIBackend(config(server, timeout_s=0.3))
        t0 = time.monotonic()
        with pytest.raises(BackendError, match=r"sent nothing for 0.3 s.*model.timeout_s"):
            list(backend.generate(prompt(), cancel=threading.Event()))
        assert time.monotonic() - t0 < 3.0
        request = server.wait_for_requests(1)[0]
        assert request.wait(5.0) and request.disconnected  # the timed-out request was cancelled too


class RawSSE(BaseHTTPRequestHandler):
    """Answers every POST with the bytes in ``server.payload`` as an event stream, then closes."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(self.server.payload)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("payload, expected, deltas", [
    (b"data: {not json}\n\n", "malformed stream.*not JSON", []),
    (b'data: {"choices": [{"index": 0, "delta": {"content": "put the"}}]}\n\n', "closed the stream before it finished",
     ["put the"]),
    (b'data: {"object": "error", "message": "CUDA out of memory"}\n\n', "mid-stream: CUDA out of memory", []),
])
def test_broken_streams_raise_a_backend_error(payload, expected, deltas):
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RawSSE)
    httpd.payload = payload
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        backend = OpenAIBackend(ModelConfig(backend="openai", base_url=f"http://127.0.0.1:{httpd.server_port}/v1",
                                            model="m", timeout_s=5.0))
        got = []
        with pytest.raises(BackendError, match=expected):
            for delta in backend.generate(prompt(), cancel=threading.Event()):
                got.append(delta)
        assert got == deltas
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5.0)


def test_sse_comments_multiline_data_and_a_plain_json_answer_are_understood():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RawSSE)
    httpd.payload = (b": keep-alive\n\nevent: message\ndata: {\"choices\": [{\"index\": 0,\n"
                     b"data: \"delta\": {\"content\": \"pick up\"}}]}\n\n"
                     b"data: {\"choices\": [{\"index\": 0, \"delta\": {\"content\": \" the cup\"}, "
                     b"\"finish_reason\": \"stop\"}]}\n\ndata: [DONE]\n\n")
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        backend = OpenAIBackend(ModelConfig(backend="openai", base_url=f"http://127.0.0.1:{httpd.server_port}/v1/",
                                            model="m", timeout_s=5.0))
        assert list(backend.generate(prompt(), cancel=threading.Event())) == ["pick up", " the cup"]
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5.0)


def test_the_api_key_is_sent_and_never_shown(server, monkeypatch):
    monkeypatch.setenv("ROBIX_TEST_KEY", "sk-secret-123")
    backend = OpenAIBackend(config(server, api_key_env="ROBIX_TEST_KEY"))
    list(backend.generate(prompt(), cancel=threading.Event()))
    assert server.wait_for_requests(1)[0].headers["authorization"] == "Bearer sk-secret-123"
    assert "sk-secret" not in repr(backend)
    server.error = (401, "invalid api key")
    with pytest.raises(BackendError) as info:
        list(backend.generate(prompt(), cancel=threading.Event()))
    assert "$ROBIX_TEST_KEY" in str(info.value) and "sk-secret" not in str(info.value)


def test_an_unset_api_key_variable_is_a_config_error(server, monkeypatch):
    monkeypatch.delenv("ROBIX_TEST_KEY", raising=False)
    with pytest.raises(ConfigError, match="api_key_env='ROBIX_TEST_KEY'.*not set"):
        OpenAIBackend(config(server, api_key_env="ROBIX_TEST_KEY"))


@pytest.mark.parametrize("missing", ["base_url", "model"])
def test_missing_settings_are_named(missing):
    cfg = {"backend": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "m", missing: None}
    with pytest.raises(ConfigError, match=f"needs model.{missing}"):
        load_backend(ModelConfig(**cfg))


def test_credentials_in_the_url_are_refused():
    with pytest.raises(ConfigError, match="api_key_env"):
        OpenAIBackend(ModelConfig(backend="openai", base_url="http://me:sk-secret@127.0.0.1:8000/v1", model="m"))


def test_fake_server_binds_loopback_only():
    with pytest.raises(ValueError, match="loopback"):
        FakeOpenAIServer(host="0.0.0.0")


def test_fake_server_runs_as_a_demo_command():
    proc = subprocess.Popen(
        [sys.executable, "-m", "robix_planner.backends.fake_openai_server", "--port", "0", "--reply", "hello there",
         "--chunk-delay-s", "0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
        line = lines.get(timeout=20.0)
        assert line.startswith("fake OpenAI server on http://127.0.0.1:"), line
        backend = OpenAIBackend(ModelConfig(backend="openai", base_url=line.split()[4], model="any", timeout_s=5.0))
        assert "".join(backend.generate(prompt(), cancel=threading.Event())) == "hello there"
    finally:
        proc.terminate()
        proc.wait(10.0)
        proc.stdout.close()
