"""The ``openai`` backend: any OpenAI-compatible chat-completions server (vLLM, SGLang).

    model:
      backend: openai
      base_url: http://127.0.0.1:8000/v1   # the server's OpenAI root
      model: robix-7b                      # the served model name (GET {base_url}/models)
      api_key_env: ROBIX_API_KEY           # optional: the variable holding the key, never the key
      timeout_s: 60                        # connect, first byte, and each gap between chunks

Each :meth:`OpenAIBackend.generate` sends one streaming request (``stream: true``) and
yields ``choices[0].delta.content`` as it arrives. Images go as content parts
``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}`` (lossless
PNG, so the server's model sees the pixels a local one would). Sampling comes from the
config: ``temperature`` (0 = greedy), ``top_p``, ``max_new_tokens`` -> ``max_tokens``,
``seed``; usage is requested with ``stream_options.include_usage``.

Cancellation: the HTTP exchange runs on a reader thread and hands events to the
generator through a queue; the generator checks ``cancel`` between events and at least
every :data:`POLL_S`. On cancel (or when the consumer drops the generator) the socket is
shut down, which wakes the reader and tells the server the client is gone: vLLM and
SGLang abort the request on disconnect and free its slot. No read blocks longer than
``timeout_s``, after which a :class:`BackendError` says what to check.

Plain ``http.client`` is used, not an HTTP library: it needs no dependency, reads no
proxy settings from the environment, and gives direct access to the socket to shut down.
Each request opens its own connection (on loopback that costs well under a millisecond;
a cancelled request cannot be reused anyway).
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import queue
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Any, Iterator, Optional

from robix_planner.backends.base import Backend, BackendError, GenerationStats, ImagePart, ModelConfig, Prompt
from robix_planner.config import ConfigError, secret_env

log = logging.getLogger(__name__)

#: How often the generator checks ``cancel`` while no chunk arrives, in seconds.
POLL_S = 0.005
#: Longest SSE line accepted (a chunk holds a few tokens; 1 MiB is far beyond any real one).
MAX_LINE_BYTES = 1 << 20
#: Most bytes of an error body read to find the server's message.
MAX_ERROR_BYTES = 64 * 1024

_END = object()


def encode_image(image: ImagePart) -> str:
    """An ``(H, W, 3)`` uint8 RGB image as a ``data:image/png;base64,...`` URL."""
    import cv2  # imported here: only this backend needs an encoder
    import numpy as np

    pixels = image.pixels
    if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[2] == 3):
        if isinstance(pixels, np.ndarray):
            desc = f"{pixels.dtype} array of shape {pixels.shape}"
        else:
            desc = type(pixels).__name__
        raise BackendError(f"image from camera {image.camera!r} must be an (H, W, 3) uint8 RGB array, got {desc}")
    ok, png = cv2.imencode(".png", np.ascontiguousarray(pixels[:, :, ::-1]))  # OpenCV wants BGR
    if not ok:
        raise BackendError(f"could not PNG-encode the image from camera {image.camera!r}")
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode("ascii")


def to_openai_messages(prompt: Prompt) -> list[dict]:
    """A :data:`Prompt` as OpenAI chat messages: text as strings, user turns with images as part lists."""
    messages = []
    for msg in prompt:
        if not msg.images:
            messages.append({"role": msg.role, "content": msg.text})
            continue
        if msg.role != "user":
            raise BackendError(f"images are only allowed in user turns, found one in a {msg.role!r} turn")
        parts: list[dict] = []
        for part in msg.content:
            if isinstance(part, ImagePart):
                parts.append({"type": "image_url", "image_url": {"url": encode_image(part)}})
            elif part:
                parts.append({"type": "text", "text": part})
        messages.append({"role": "user", "content": parts})
    return messages


def _server_message(raw: bytes) -> str:
    """The human-readable message in an error body (OpenAI, vLLM, FastAPI shapes), else the raw text."""
    text = raw.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return text[:500] or "(empty body)"
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if isinstance(err, str):
            return err
        for key in ("message", "detail"):
            if data.get(key):
                return str(data[key])
    return text[:500]


class _Exchange:
    """One HTTP request on its own thread; the socket can be shut down from any thread."""

    def __init__(self, backend: "OpenAIBackend", body: bytes):
        self.backend = backend
        self.body = body
        self.events: "queue.SimpleQueue[Any]" = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._conn: Optional[http.client.HTTPConnection] = None
        # The socket itself: http.client drops conn.sock when a response says "Connection: close".
        self._sock: Optional[socket.socket] = None
        self._aborted = False
        self.thread = threading.Thread(target=self._run, name="openai-stream", daemon=True)

    def abort(self) -> None:
        """Close the connection now (cancels the request on the server); wakes a blocked read."""
        with self._lock:
            self._aborted = True
            sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _run(self) -> None:
        b = self.backend
        resp: Optional[http.client.HTTPResponse] = None
        try:
            conn = b._connection()
            with self._lock:
                if self._aborted:
                    return
                self._conn = conn
            conn.connect()
            with self._lock:
                self._sock = conn.sock
                if self._aborted:  # abort() ran during connect()
                    return
            conn.request("POST", b._path, body=self.body, headers=b._headers)
            resp = conn.getresponse()
            if resp.status != 200:
                msg = _server_message(resp.read(MAX_ERROR_BYTES))
                self.events.put(BackendError(b._http_error(resp.status, msg)))
                return
            ctype = resp.getheader("Content-Type", "")
            if "text/event-stream" not in ctype:
                self.events.put(("json", resp.read(MAX_LINE_BYTES)))
                return
            data: list[bytes] = []
            while True:
                line = resp.readline(MAX_LINE_BYTES + 1)
                if not line:
                    break  # the server closed the stream
                if len(line) > MAX_LINE_BYTES:
                    raise BackendError(f"malformed stream from {b._url}: a line longer than {MAX_LINE_BYTES} bytes")
                line = line.rstrip(b"\r\n")
                if not line:  # a blank line ends an SSE event
                    if data:
                        self.events.put(("data", b"\n".join(data)))
                        data = []
                elif line.startswith(b"data:"):
                    value = line[5:]
                    data.append(value[1:] if value.startswith(b" ") else value)
                # comments (":keep-alive"), "event:", "id:" and "retry:" lines carry no text
            if data:
                self.events.put(("data", b"\n".join(data)))
        except BackendError as exc:
            self.events.put(exc)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a BackendError for the caller
            if not self._aborted:
                self.events.put(BackendError(b._transport_error(exc)))
        finally:
            with self._lock:
                conn, self._conn, self._sock = self._conn, None, None
            if resp is not None:
                resp.close()
            if conn is not None:
                conn.close()
            self.events.put(_END)


class OpenAIBackend(Backend):
    """Streams from an OpenAI-compatible ``/chat/completions`` endpoint; see the module docstring."""

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        for key, example in (("base_url", "http://127.0.0.1:8000/v1"), ("model", "the served model name")):
            if not getattr(config, key):
                raise ConfigError(f"model.backend='openai' needs model.{key} ({example}); set it")
        url = urllib.parse.urlsplit(config.base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"model.base_url={config.base_url!r} must be an http:// or https:// URL with a host")
        if url.username or url.password:
            raise ConfigError("model.base_url must not hold credentials; put the API key in an environment "
                              "variable and name it in model.api_key_env")
        if config.timeout_s <= 0:
            raise ConfigError(f"model.timeout_s={config.timeout_s} must be > 0")
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port or (443 if self._https else 80)
        path = url.path.rstrip("/")
        self._path = path if path.endswith("/chat/completions") else path + "/chat/completions"
        self._url = f"{url.scheme}://{url.netloc}{self._path}"
        self._headers = {"Content-Type": "application/json", "Accept": "text/event-stream",
                         "User-Agent": "robix-planner"}
        if config.api_key_env:
            key = secret_env(config.api_key_env)
            if not key:
                raise ConfigError(f"model.api_key_env={config.api_key_env!r}: that environment variable is not set "
                                  "or empty; export the API key in it, or remove model.api_key_env")
            self._headers["Authorization"] = f"Bearer {key}"
        self._lock = threading.Lock()
        self._active: set[_Exchange] = set()

    def __repr__(self) -> str:  # no headers: they hold the key
        return f"OpenAIBackend(url={self._url!r}, model={self.config.model!r})"

    # -- transport --------------------------------------------------------------------

    def _connection(self) -> http.client.HTTPConnection:
        if self._https:
            return http.client.HTTPSConnection(self._host, self._port, timeout=self.config.timeout_s,
                                               context=ssl.create_default_context())
        return http.client.HTTPConnection(self._host, self._port, timeout=self.config.timeout_s)

    def _http_error(self, status: int, message: str) -> str:
        hint = {
            400: "check the request the server refused (max_new_tokens against the server's context length, "
                 "image support of the served model)",
            401: f"check the API key in ${self.config.api_key_env}" if self.config.api_key_env
                 else "the server wants an API key: set model.api_key_env to the variable that holds it",
            403: f"check the API key in ${self.config.api_key_env} and its permissions",
            404: f"check model.model={self.config.model!r} (the served names are listed at GET "
                 f"{self.config.base_url.rstrip('/')}/models) and model.base_url",
            413: "the request is too large for the server: fewer or smaller images",
            429: "the server is overloaded or rate-limited: retry later or lower the request rate",
        }.get(status, "check the server's log" if status >= 500 else "check the server's log and model.base_url")
        return f"{self._url} answered HTTP {status}: {message} ({hint})"

    def _transport_error(self, exc: BaseException) -> str:
        where = f"{self._host}:{self._port}"
        if isinstance(exc, ConnectionRefusedError):
            return (f"cannot connect to {where}: connection refused; is the server running "
                    f"(e.g. `vllm serve ...`) and is model.base_url={self.config.base_url!r} right?")
        if isinstance(exc, socket.gaierror):
            return f"cannot resolve {self._host!r} ({exc}); check model.base_url={self.config.base_url!r}"
        if isinstance(exc, (socket.timeout, TimeoutError)):
            return (f"{self._url} sent nothing for {self.config.timeout_s:g} s (model.timeout_s); the server is "
                    "overloaded or stuck: check its log, or raise model.timeout_s")
        if isinstance(exc, ssl.SSLError):
            return f"TLS with {where} failed ({exc}); check model.base_url={self.config.base_url!r}"
        if isinstance(exc, (http.client.HTTPException, ConnectionError)):
            return (f"{self._url} broke off the response ({type(exc).__name__}: {exc}); "
                    "check that it is an OpenAI-compatible server and read its log")
        return f"request to {self._url} failed: {type(exc).__name__}: {exc}"

    # -- generation -------------------------------------------------------------------

    def request_body(self, prompt: Prompt) -> dict:
        """The JSON body sent for ``prompt`` (exposed for tests and debugging)."""
        c = self.config
        return {
            "model": c.model,
            "messages": to_openai_messages(prompt),
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": c.max_new_tokens,
            "temperature": c.temperature,
            "top_p": c.top_p,
            "seed": c.seed,
        }

    def generate(self, prompt: Prompt, *, cancel: threading.Event) -> Iterator[str]:
        stats = self.last_stats = GenerationStats()
        if cancel.is_set():  # superseded before it started: send nothing
            stats.cancelled = True
            return
        body = json.dumps(self.request_body(prompt)).encode()
        exchange = _Exchange(self, body)
        with self._lock:
            self._active.add(exchange)
        t0 = time.perf_counter()
        t_first: Optional[float] = None
        usage: Optional[dict] = None
        finish: Optional[str] = None
        deltas = 0
        exchange.thread.start()
        try:
            while True:
                if cancel.is_set():
                    stats.cancelled = True
                    return
                try:
                    event = exchange.events.get(timeout=POLL_S)
                except queue.Empty:
                    continue
                if event is _END:
                    if finish is None and not cancel.is_set():
                        raise BackendError(f"{self._url} closed the stream before it finished (no finish_reason); "
                                           "check the server's log")
                    return
                if isinstance(event, BackendError):
                    raise event
                kind, raw = event
                if kind == "json":  # the server ignored stream=true and sent one JSON answer
                    text, finish, usage = self._parse_completion(raw)
                    if text and not cancel.is_set():
                        t_first = t_first or time.perf_counter()
                        deltas += 1
                        yield text
                    continue
                if raw.strip() == b"[DONE]":
                    if finish is None:
                        finish = "done"
                    continue
                text, chunk_finish, chunk_usage = self._parse_chunk(raw)
                finish = chunk_finish or finish
                usage = chunk_usage or usage
                if text:
                    if cancel.is_set():
                        stats.cancelled = True
                        return
                    if t_first is None:
                        t_first = time.perf_counter()
                    deltas += 1
                    yield text
        finally:
            exchange.abort()  # no-op after a normal end; cancels the request otherwise
            exchange.thread.join(timeout=0.1)  # a reader stuck in connect() ends on its own (daemon)
            with self._lock:
                self._active.discard(exchange)
            t_end = time.perf_counter()
            stats.prefill_ms = ((t_first or t_end) - t0) * 1e3
            stats.decode_ms = (t_end - t_first) * 1e3 if t_first is not None else 0.0
            stats.new_tokens = deltas
            stats.extra["finish_reason"] = finish
            stats.extra["usage_reported"] = usage is not None
            if usage:
                stats.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                stats.new_tokens = int(usage.get("completion_tokens") or deltas)
                details = usage.get("prompt_tokens_details") or {}
                stats.cached_tokens = int(details.get("cached_tokens") or 0)
            log.debug("openai generation: %d deltas, finish=%s, cancelled=%s, ttft %.1f ms",
                      deltas, finish, stats.cancelled, stats.prefill_ms)

    def _parse_chunk(self, raw: bytes) -> tuple[str, Optional[str], Optional[dict]]:
        try:
            obj = json.loads(raw)
        except ValueError:
            raise BackendError(f"malformed stream from {self._url}: an event is not JSON ({raw[:200]!r}); "
                               "check that model.base_url points at an OpenAI-compatible server") from None
        if not isinstance(obj, dict):
            raise BackendError(f"malformed stream from {self._url}: an event is {type(obj).__name__}, not an object")
        if "error" in obj or obj.get("object") == "error":
            raise BackendError(f"{self._url} reported an error mid-stream: {_server_message(raw)} "
                               "(check the server's log)")
        text, finish = "", None
        choices = obj.get("choices") or []
        if not isinstance(choices, list):
            raise BackendError(f"malformed stream from {self._url}: 'choices' is not a list")
        for ch in choices:
            if not isinstance(ch, dict) or ch.get("index", 0) != 0:
                continue
            delta = ch.get("delta") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str):
                text += content
            finish = ch.get("finish_reason") or finish
        usage = obj.get("usage")
        return text, finish, usage if isinstance(usage, dict) else None

    def _parse_completion(self, raw: bytes) -> tuple[str, Optional[str], Optional[dict]]:
        try:
            obj = json.loads(raw)
            choice = obj["choices"][0]
            text = choice["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise BackendError(f"{self._url} answered neither an event stream nor a chat completion "
                               f"({raw[:200]!r}); check model.base_url") from None
        usage = obj.get("usage")
        return str(text), choice.get("finish_reason") or "stop", usage if isinstance(usage, dict) else None

    def close(self) -> None:
        """Abort every request still in flight."""
        with self._lock:
            active = list(self._active)
        for exchange in active:
            exchange.abort()
