"""The wire codec: a message <-> a list of ZeroMQ frames. Specified in docs/protocol.md.

Frames of one bus message (a ZeroMQ multipart message):

0. the topic, UTF-8 (``/controller/command``);
1. the envelope, one msgpack map ``{"v": 1, "src": <publisher id>, "seq": <n>, "msg": {...}}``
   where ``msg`` is the message with its ``type`` tag;
2. and on: blobs, in the order the message's blob fields name them (an image's pixels).

A blob field holds, in the msgpack map, the index of its frame, or, when the publisher
put the bytes into its shared-memory ring (same-host subscribers only, see
:mod:`robix_planner.shm`), a :class:`ShmBlob` descriptor instead; such a blob has no frame.
:func:`decode` validates the descriptor's fields; the bus reads the bytes.

Everything received is validated here. Any fault raises :class:`ProtocolError`; nothing
that arrives is ever unpickled or evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Callable, Optional, Sequence

import msgspec
from msgspec import Meta

from robix_planner.messages import PROTOCOL_VERSION, AnyMessage, Image, Message

MAX_TOPIC_BYTES = 256
DEFAULT_MAX_HEADER_BYTES = 1 << 20  # 1 MiB of msgpack is far more than any header needs
DEFAULT_MAX_BLOB_BYTES = 64 << 20  # 64 MiB: an 8K RGB frame is 99 MiB, 4K is 24 MiB
#: Most slots a shared-memory ring may have (its slot words fill the 4 KiB header page).
SHM_MAX_SLOTS = 256
#: Segment names: a file of this name in /dev/shm (no path separators, no dot files).
SHM_NAME_PATTERN = r"^robix-[A-Za-z0-9_-]{1,128}$"
_U62 = 1 << 62


class ProtocolError(ValueError):
    """Bytes that are not a valid Robix bus message. Nodes log and count these; they never crash."""


class ShmBlob(msgspec.Struct, kw_only=True):
    """A blob in the publisher's shared-memory ring, sent in place of a blob frame (docs/protocol.md 15).

    ``shm``: the segment (a file in /dev/shm); ``slot``: the ring slot; ``offset``, ``size``: the
    bytes in the segment file; ``gen``: the segment's write count when the slot was filled,
    checked against the slot's generation word under the reader's lease, so a slot the
    publisher has reused since is detected (stale), never read as this blob.
    """

    shm: Annotated[str, Meta(pattern=SHM_NAME_PATTERN)]
    slot: Annotated[int, Meta(ge=0, lt=SHM_MAX_SLOTS)]
    offset: Annotated[int, Meta(ge=0, lt=_U62)]
    size: Annotated[int, Meta(ge=0, lt=_U62)]
    gen: Annotated[int, Meta(ge=1, lt=_U62)]


class Envelope(msgspec.Struct, kw_only=True):
    v: int
    src: str
    seq: int
    msg: AnyMessage  # type: ignore[valid-type]


@dataclass(frozen=True)
class Received:
    topic: str
    src: str
    seq: int
    msg: Message
    nbytes: int
    #: True when a blob came as a :class:`ShmBlob` descriptor: until the bus has read it
    #: (:meth:`robix_planner.shm.ShmReader.resolve`), the blob field holds the descriptor.
    shm: bool = False


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Envelope)


def _as_buffer(value):
    """Bytes-like view of a blob value, without copying when possible."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return value
    if hasattr(value, "__array_interface__") or hasattr(value, "__buffer__"):
        # numpy arrays export the buffer protocol; zmq sends them without a copy.
        return value
    raise TypeError(f"a blob field must hold bytes, memoryview or a numpy array, not {type(value).__name__}")


def _nbytes(buf) -> int:
    return buf.nbytes if hasattr(buf, "nbytes") else len(buf)


def encode(topic: str, msg: Message, *, src: str, seq: int,
           shm: Optional[Callable[[object], Optional[ShmBlob]]] = None) -> list:
    """Frames for ``msg`` on ``topic``. Blob values are passed through (zero-copy).

    ``shm``: a shared-memory writer (:meth:`robix_planner.shm.ShmRing.put`); each blob is
    offered to it first, and one it takes travels as its descriptor instead of a frame.
    """
    frames: list = [topic.encode()]
    blobs: list = []
    if msg.blob_fields:
        replace = {}
        for name in msg.blob_fields:
            value = getattr(msg, name)
            if value is None:
                raise ValueError(f"{type(msg).__name__}.{name} is empty; set the bytes before publishing")
            buf = _as_buffer(value)
            ref = shm(buf) if shm is not None else None
            if ref is not None:
                replace[name] = ref
                continue
            blobs.append(buf)
            replace[name] = 1 + len(blobs)  # frame index: 2, 3, ...
        msg = msgspec.structs.replace(msg, **replace)
    frames.append(_encoder.encode(Envelope(v=PROTOCOL_VERSION, src=src, seq=seq, msg=msg)))
    frames.extend(blobs)
    return frames


def _frame_view(frame) -> memoryview:
    if isinstance(frame, (bytes, bytearray)):
        return memoryview(frame)
    if isinstance(frame, memoryview):
        return frame
    buffer = getattr(frame, "buffer", None)  # zmq.Frame: a zero-copy view of the received bytes
    if buffer is not None:
        return buffer
    return memoryview(frame).cast("B")  # numpy array or other buffer (in-process loopback)


def decode(
    frames: Sequence,
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
    allow_shm: bool = False,
) -> Received:
    """Validate and decode one received multipart message; raise :class:`ProtocolError` on any fault.

    ``allow_shm``: accept :class:`ShmBlob` descriptors in blob fields (validated here, read by
    the caller: ``Received.shm`` says so). Without it a descriptor is a protocol error.
    """
    if len(frames) < 2:
        raise ProtocolError(f"expected at least 2 frames (topic, envelope), got {len(frames)}")
    views = [_frame_view(f) for f in frames]
    topic_b, header = views[0], views[1]
    if len(topic_b) == 0 or len(topic_b) > MAX_TOPIC_BYTES:
        raise ProtocolError(f"topic frame has {len(topic_b)} bytes; 1..{MAX_TOPIC_BYTES} allowed")
    if len(header) > max_header_bytes:
        raise ProtocolError(f"envelope has {len(header)} bytes; the limit is {max_header_bytes}")
    try:
        topic = bytes(topic_b).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"topic is not UTF-8: {exc}") from None
    try:
        env = _decoder.decode(header)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:  # bad UTF-8 in a str
        raise ProtocolError(f"bad envelope on {topic!r}: {exc}") from None
    if env.v != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {env.v} on {topic!r}; this node speaks {PROTOCOL_VERSION}")
    msg = env.msg
    blob_fields = msg.blob_fields
    # Blobs in frames are numbered 2, 3, ... in the order of the blob fields; a blob that
    # came through shared memory has a descriptor instead, and no frame.
    refs: dict[str, ShmBlob] = {}
    framed: list[str] = []
    for name in blob_fields:
        value = getattr(msg, name)
        if type(value) is dict:
            if not allow_shm:
                raise ProtocolError(f"{type(msg).__name__}.{name} on {topic!r} is a shared-memory descriptor; "
                                    "this receiver takes blobs in frames only")
            try:
                ref = msgspec.convert(value, ShmBlob)
            except msgspec.ValidationError as exc:
                raise ProtocolError(f"bad shared-memory descriptor in {type(msg).__name__}.{name}: {exc}") from None
            if ref.size > max_blob_bytes:
                raise ProtocolError(f"blob {name} has {ref.size} bytes; the limit is {max_blob_bytes}")
            refs[name] = ref
        elif type(value) is int:  # not 2.0, not True: hostile peers send both
            framed.append(name)
        else:
            raise ProtocolError(f"{type(msg).__name__}.{name} must be frame index {2 + len(framed)}"
                                f"{' or a shared-memory descriptor' if allow_shm else ''}, got {value!r}")
    if len(views) != 2 + len(framed):
        raise ProtocolError(
            f"{type(msg).__name__} on {topic!r} needs {2 + len(framed)} frames, got {len(views)}"
        )
    nbytes = len(header)
    for i, name in enumerate(framed):
        index = getattr(msg, name)
        if index != 2 + i:
            raise ProtocolError(f"{type(msg).__name__}.{name} must be frame index {2 + i}, got {index!r}")
        blob = views[index]
        if len(blob) > max_blob_bytes:
            raise ProtocolError(f"blob {name} has {len(blob)} bytes; the limit is {max_blob_bytes}")
        setattr(msg, name, blob)
        nbytes += len(blob)
    for name, ref in refs.items():
        setattr(msg, name, ref)
        nbytes += ref.size
    _check_blobs(msg)
    return Received(topic=topic, src=env.src, seq=env.seq, msg=msg, nbytes=nbytes, shm=bool(refs))


def _check_blobs(msg: Message) -> None:
    if isinstance(msg, Image):
        if isinstance(msg.data, ShmBlob):
            size = msg.data.size
        elif isinstance(msg.data, (bytes, bytearray, memoryview)):
            size = len(msg.data)
        else:
            raise ProtocolError(f"image data must be bytes, got {type(msg.data).__name__}")
        expected = msg.expected_nbytes()
        if expected is not None and expected != size:
            raise ProtocolError(
                f"image {msg.width}x{msg.height} {msg.encoding.value} needs {expected} bytes, got {size}"
            )


def to_builtins(msg: Message) -> dict:
    """A message as plain Python data (blobs summarised), for echo, logs and JSON."""
    out = msgspec.to_builtins(msgspec.structs.replace(msg, **{n: None for n in msg.blob_fields}))
    for name in msg.blob_fields:
        value = getattr(msg, name)
        out[name] = f"<{_nbytes(_as_buffer(value)) if value is not None else 0} bytes>"
    return out


def from_builtins(type_cls: type[Message], data: dict) -> Message:
    """Build a message from plain data (YAML/JSON), validating every field."""
    if not isinstance(data, dict):
        raise ProtocolError(f"{type_cls.__name__} data must be a mapping, got {type(data).__name__}")
    data = {k: v for k, v in data.items() if k != "type"}
    try:
        return msgspec.convert(data, type_cls)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"bad {type_cls.__name__}: {exc}") from None


def pack_message(msg: Message) -> bytes:
    """One self-contained msgpack map of ``msg`` with blobs inline as bin (for MCAP records)."""
    if msg.blob_fields:
        msg = msgspec.structs.replace(
            msg, **{n: memoryview(_as_buffer(getattr(msg, n))).cast("B") for n in msg.blob_fields}
        )
    return _encoder.encode(msg)


def unpack_message(data: bytes) -> Message:
    """Inverse of :func:`pack_message`, validated."""
    try:
        msg = _single_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"bad recorded message: {exc}") from None
    _check_blobs(msg)
    return msg


_single_decoder = msgspec.msgpack.Decoder(AnyMessage)
