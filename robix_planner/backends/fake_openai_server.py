"""A small OpenAI-compatible chat-completions server, for tests and demos.

It speaks the streaming protocol vLLM and SGLang speak (``POST /v1/chat/completions``
with ``stream: true`` answers Server-Sent Events over chunked transfer encoding: one
``data: {...}`` event per piece with ``choices[0].delta.content``, a final event with
``finish_reason``, an optional usage event, then ``data: [DONE]``), so the ``openai``
backend is tested against the same seam a real server offers:

    with FakeOpenAIServer(replies=["<|think_start|>…"], chunk_delay_s=0.01) as server:
        backend = OpenAIBackend(ModelConfig(backend="openai", base_url=server.base_url, model="fake"))
        ...
        request = server.wait_for_requests(1)[0]
        request.wait(2.0); assert request.disconnected

Every request is recorded (:class:`RecordedRequest`), including whether the client
closed the connection mid-stream: like a real server, it notices the client's FIN while
waiting between pieces, and a failed write, and then stops generating.

Replies are canned (one per request, the last repeats) or come from a callable
``respond(body) -> str`` (an exception it raises becomes an HTTP 500 with its message);
``error=(status, message)`` makes every chat request fail with an OpenAI-style error.
It binds loopback only, bounds request sizes (413) and socket reads (``io_timeout_s``).

Run it for a demo::

    python -m robix_planner.backends.fake_openai_server --port 8000 --reply '<|think_start|>…'
"""

from __future__ import annotations

import argparse
import base64
import binascii
import ipaddress
import itertools
import json
import logging
import select
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional, Sequence

from robix_planner.backends.scripted import split_chunks

log = logging.getLogger(__name__)

DEFAULT_REPLY = (
    "<|think_start|>The user wants the table cleared. I see a red cup next to the plate; "
    "it goes into the bus tub first.<|think_end|>"
    "<|plan_start|>put the red cup into the bus tub<|plan_end|>"
    "<|response_start|>Sure, I will clear the table.<|response_end|>"
)


@dataclass
class RecordedRequest:
    """One request the fake server received, and what became of it."""

    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    body: Any = None  # the parsed JSON body (None when there was none or it was not JSON)
    status: int = 0  # the HTTP status answered
    chunks_sent: int = 0  # content pieces written to the stream
    completed: bool = False  # the whole reply and `data: [DONE]` went out
    disconnected: bool = False  # the client closed the connection before the end
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    def wait(self, timeout_s: float) -> bool:
        """Wait until the server has finished with this request; False on timeout."""
        return self.done.wait(timeout_s)

    @property
    def image_urls(self) -> list[str]:
        """The ``image_url`` URLs of every message, in order."""
        urls: list[str] = []
        messages = self.body.get("messages") if isinstance(self.body, dict) else None
        for msg in messages if isinstance(messages, list) else []:
            content = msg.get("content") if isinstance(msg, dict) else None
            if isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and part.get("type") == "image_url":
                        urls.append(str((part.get("image_url") or {}).get("url", "")))
        return urls


class HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "BadRequestError"):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _prompt_text(messages: list) -> str:
    parts = []
    for msg in messages:
        content = msg.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            for part in content:
                parts.append(part.get("text", "") if part.get("type") == "text" else "<image>")
        parts.append("\n")
    return "".join(parts)


def _check_messages(body: Any) -> list:
    """Validate the request body the way a real server would (a 400 otherwise)."""
    if not isinstance(body, dict):
        raise HTTPError(400, "the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "'messages' must be a non-empty list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            raise HTTPError(400, f"messages[{i}] must be an object with role system, user or assistant")
        content = msg.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise HTTPError(400, f"messages[{i}].content must be a string or a list of parts")
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                continue
            if kind == "image_url":
                url = str((part.get("image_url") or {}).get("url", ""))
                head, sep, data = url.partition(";base64,")
                if not (url.startswith("data:image/") and sep):
                    raise HTTPError(400, f"messages[{i}].content[{j}]: image_url must be a data:image/...;base64 URL")
                try:
                    base64.b64decode(data, validate=True)
                except binascii.Error:
                    raise HTTPError(400, f"messages[{i}].content[{j}]: the image is not valid base64") from None
                continue
            raise HTTPError(400, f"messages[{i}].content[{j}] has unsupported type {kind!r}")
    return messages


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "RobixFakeOpenAI/1"
    server: "_Server"

    def setup(self) -> None:
        self.timeout = self.server.fake.io_timeout_s  # bounds every socket read and write
        super().setup()

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (the stdlib's name)
        log.debug("%s " + format, self.address_string(), *args)

    # -- plumbing ---------------------------------------------------------------------

    def _record(self, body: Any = None) -> RecordedRequest:
        rec = RecordedRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body)
        self.server.fake._add(rec)
        return rec

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.close_connection = True

    def _send_error(self, exc: HTTPError) -> None:
        self._send_json(exc.status, {"error": {"message": exc.message, "type": exc.kind, "code": exc.status}})

    def _read_body(self) -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise HTTPError(411, "chunked request bodies are not supported; send Content-Length")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise HTTPError(411, "Content-Length is required") from None
        if length < 0 or length > self.server.fake.max_request_bytes:
            raise HTTPError(413, f"request body of {length} bytes exceeds {self.server.fake.max_request_bytes}")
        raw = self.rfile.read(length)
        if len(raw) != length:
            raise HTTPError(400, "request body shorter than Content-Length")
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise HTTPError(400, f"request body is not valid JSON: {exc}") from None

    # -- endpoints --------------------------------------------------------------------

    def do_GET(self) -> None:
        rec = self._record()
        try:
            if self.path.rstrip("/") != "/v1/models":
                raise HTTPError(404, f"no route {self.path}", "NotFoundError")
            rec.status = 200
            model = self.server.fake.model or "fake"
            self._send_json(200, {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "robix"}]})
        except HTTPError as exc:
            rec.status = exc.status
            self._send_error(exc)
        finally:
            rec.done.set()

    def do_POST(self) -> None:
        fake = self.server.fake
        rec: Optional[RecordedRequest] = None
        try:
            try:
                if self.path.split("?")[0].rstrip("/") != "/v1/chat/completions":
                    rec = self._record()
                    raise HTTPError(404, f"no route {self.path}", "NotFoundError")
                body = self._read_body()
                rec = self._record(body)
                messages = _check_messages(body)
                model = body.get("model")
                if fake.model is not None and model != fake.model:
                    raise HTTPError(404, f"The model `{model}` does not exist.", "NotFoundError")
                if fake.error is not None:
                    status, message = fake.error
                    raise HTTPError(status, message, "InternalServerError" if status >= 500 else "BadRequestError")
                reply = fake._reply(body)
            except HTTPError as exc:
                if rec is None:
                    rec = self._record()
                rec.status = exc.status
                self._send_error(exc)
                if exc.status in (411, 413):
                    self._drain_and_close()
                return
            rec.status = 200
            pieces = split_chunks(reply)
            max_tokens = body.get("max_tokens")
            finish = "stop"
            if isinstance(max_tokens, int) and 0 <= max_tokens < len(pieces):
                pieces, finish = pieces[:max_tokens], "length"
            usage = fake._usage(messages, len(pieces))
            if body.get("stream"):
                self._stream(rec, body, pieces, finish, usage)
            else:
                self._send_json(200, {
                    "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                                 "finish_reason": finish}],
                    "usage": usage,
                })
                rec.chunks_sent, rec.completed = len(pieces), True
        except (BrokenPipeError, ConnectionResetError, socket.timeout) as exc:
            if rec is not None:
                rec.disconnected = True
            log.debug("client went away: %r", exc)
            self.close_connection = True
        finally:
            if rec is not None:
                rec.done.set()
                log.info("%s %s -> %d: %d images, %d pieces sent%s", self.command, self.path, rec.status,
                         len(rec.image_urls), rec.chunks_sent, ", client disconnected" if rec.disconnected else "")

    def _drain_and_close(self, wait_s: float = 1.0, limit: int = 64 << 20) -> None:
        """After refusing an unread body: read and drop what the client still sends (bounded), then close.

        Closing a socket with unread bytes makes the kernel send a reset, which can destroy the
        error response before the client reads it.
        """
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(wait_s)
            deadline, total = time.monotonic() + wait_s, 0
            while time.monotonic() < deadline and total < limit:
                data = self.connection.recv(1 << 16)
                if not data:
                    break
                total += len(data)
        except OSError:
            pass

    def _stream(self, rec: RecordedRequest, body: dict, pieces: list[str], finish: str, usage: dict) -> None:
        fake = self.server.fake
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": body.get("model")}

        def event(payload: Any) -> None:
            data = b"data: " + (payload if isinstance(payload, bytes) else json.dumps(payload).encode()) + b"\n\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        def choice(delta: dict, finish_reason: Optional[str] = None) -> dict:
            return {**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

        event(choice({"role": "assistant", "content": ""}))
        for i, piece in enumerate(pieces):
            if i and self._client_gone(fake.chunk_delay_s):
                rec.disconnected = True
                log.info("client disconnected after %d of %d pieces; generation aborted", i, len(pieces))
                return
            event(choice({"content": piece}))
            rec.chunks_sent += 1
        event(choice({}, finish))
        if (body.get("stream_options") or {}).get("include_usage"):
            event({**base, "choices": [], "usage": usage})
        event(b"[DONE]")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()
        rec.completed = True

    def _client_gone(self, wait_s: float) -> bool:
        """Wait ``wait_s`` (cut short by a stop); True as soon as the client has closed its end."""
        deadline = time.monotonic() + wait_s
        fake = self.server.fake
        while True:
            if fake._stopping.is_set():
                return True
            left = deadline - time.monotonic()
            readable, _, _ = select.select([self.connection], [], [], max(0.0, min(left, 0.05)))
            if readable:
                try:
                    if self.connection.recv(1, socket.MSG_PEEK) == b"":
                        return True
                except OSError:
                    return True
                # The client sent more bytes (pipelining): no longer a disconnect signal; just wait.
                fake._stopping.wait(max(0.0, deadline - time.monotonic()))
                return fake._stopping.is_set()
            if left <= 0:
                return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: "FakeOpenAIServer"


class FakeOpenAIServer:
    """A local OpenAI-compatible streaming chat server. Use as a context manager, or start()/stop()."""

    def __init__(
        self,
        replies: Sequence[str] = (DEFAULT_REPLY,),
        *,
        respond: Optional[Callable[[dict], str]] = None,
        chunk_delay_s: float = 0.0,
        model: Optional[str] = None,
        error: Optional[tuple[int, str]] = None,
        host: str = "127.0.0.1",
        port: int = 0,
        max_request_bytes: int = 32 * 1024 * 1024,
        io_timeout_s: float = 10.0,
        keep_requests: Optional[int] = None,
    ):
        """``model``: when set, requests for another model get a 404 like vLLM's.
        ``keep_requests``: how many recent requests :attr:`requests` keeps (None: all; a
        long-running demo should bound it, as each body holds its images)."""
        if respond is None and not replies:
            raise ValueError("give at least one reply or a respond callable")
        addr = "127.0.0.1" if host == "localhost" else host
        try:
            loopback = ipaddress.ip_address(addr).is_loopback and ipaddress.ip_address(addr).version == 4
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"the fake server binds an IPv4 loopback address only, not {host!r}")
        self.replies = list(replies)
        self.respond = respond
        self.chunk_delay_s = float(chunk_delay_s)
        self.model = model
        self.error = error
        self.max_request_bytes = int(max_request_bytes)
        self.io_timeout_s = float(io_timeout_s)
        self.keep_requests = keep_requests
        self.requests: list[RecordedRequest] = []
        self._cond = threading.Condition()
        self._chat_calls = itertools.count()
        self._last_prompt: list[str] = []
        self._stopping = threading.Event()
        self._httpd = _Server((addr, port), _Handler)
        self._httpd.fake = self
        self._thread: Optional[threading.Thread] = None

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        """What to put in ``model.base_url``."""
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FakeOpenAIServer":
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                            name="fake-openai-server", daemon=True)
            self._thread.start()
            log.info("fake OpenAI server on %s", self.base_url)
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` (from another thread) or Ctrl-C."""
        self._httpd.serve_forever(poll_interval=0.05)

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(timeout=5.0)
            self._thread = None
        self._httpd.server_close()

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_for_requests(self, n: int, timeout_s: float = 5.0) -> list[RecordedRequest]:
        """The first ``n`` recorded requests, waiting up to ``timeout_s`` for them to arrive."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.requests) >= n, timeout=timeout_s):
                raise TimeoutError(f"the fake server got {len(self.requests)} requests, expected {n}")
            return self.requests[:n]

    # -- called by the handler --------------------------------------------------------

    def _add(self, rec: RecordedRequest) -> None:
        with self._cond:
            self.requests.append(rec)
            if self.keep_requests is not None and len(self.requests) > self.keep_requests:
                del self.requests[0]
            self._cond.notify_all()

    def _reply(self, body: dict) -> str:
        index = next(self._chat_calls)
        if self.respond is None:
            return self.replies[min(index, len(self.replies) - 1)]
        try:
            text = self.respond(body)
        except Exception as exc:
            log.warning("respond callable failed: %r", exc)
            raise HTTPError(500, f"respond failed: {exc}", "InternalServerError") from None
        return str(text)

    def _usage(self, messages: list, completion_tokens: int) -> dict:
        """Token counts in the style of a server with prefix caching (pieces stand in for tokens)."""
        prompt = split_chunks(_prompt_text(messages))
        with self._cond:
            previous, self._last_prompt = self._last_prompt, prompt
        cached = 0
        for a, b in zip(prompt, previous):
            if a != b:
                break
            cached += 1
        return {"prompt_tokens": len(prompt), "completion_tokens": completion_tokens,
                "total_tokens": len(prompt) + completion_tokens,
                "prompt_tokens_details": {"cached_tokens": cached}}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m robix_planner.backends.fake_openai_server",
        description="A fake OpenAI-compatible streaming chat server (loopback only) for demos and tests.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    parser.add_argument("--reply", action="append", default=None,
                        help="a canned reply, one per request, the last repeats (repeatable; default: a demo step)")
    parser.add_argument("--chunk-delay-s", type=float, default=0.02, help="seconds between streamed pieces")
    parser.add_argument("--model", default=None, help="only answer requests for this model name (others get 404)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = make_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    server = FakeOpenAIServer(args.reply or (DEFAULT_REPLY,), chunk_delay_s=args.chunk_delay_s, model=args.model,
                              host=args.host, port=args.port, keep_requests=16)
    print(f"fake OpenAI server on {server.base_url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
