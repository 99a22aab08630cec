"""Shared-memory blobs for same-host subscribers (docs/protocol.md, section 15).

Copying a 0.92 MB camera frame through the kernel and ZeroMQ's IO threads costs a few hundred
µs and, on a small machine, a millisecond-wide tail. For subscribers on the same host a
*latest* publisher instead puts a large blob into a ring of slots in a file under
``/dev/shm`` that it owns, and sends, where the blob frame would go, a small
:class:`~robix_planner.wire.ShmBlob` descriptor in the msgpack message; the rest of the
message still travels over its ZeroMQ socket.

* :class:`ShmRing` (publisher): one segment of ``slots`` slots, created ``O_EXCL`` with mode
  ``0600``, its pages reserved with ``posix_fallocate`` (a full ``/dev/shm`` fails there,
  never with SIGBUS later: the publisher then sends frames). A blob is copied into a free
  slot, or, zero-copy, written there by the producer through :meth:`ShmRing.loan`. A bigger
  blob makes a new, bigger segment.
* :class:`ShmReader` (subscriber): maps segments read-only after checking owner, mode, size
  and header, validates every descriptor field against the mapping, and hands out a
  read-only view of the slot — no copy — while it holds a *lease* on the slot.

Leases are open-file-description byte-range locks (``F_OFD_SETLK``) on one byte per slot
in the segment's header page: a reader holds a shared lock on the slot's byte while a view
of it is alive (released when the last reference to the view goes); the publisher takes an
exclusive lock on a slot's byte before it writes the slot, and skips slots it cannot lock.
So a slot is never rewritten while a reader uses it; the kernel orders the memory accesses
(no fences needed in any language) and drops the locks of a process that dies. A reader
that would hold more than a quarter of a ring's slots copies the blob out instead. Each
slot also has a 64-bit *generation word* (``gen << 1`` once it holds the blob of write
number ``gen``, ``| 1`` while being written): a descriptor whose slot has since been
rewritten is *stale* (:class:`StaleBlob`: dropped and counted, ``shm_stale``); anything else
wrong is a :class:`~robix_planner.wire.ProtocolError`. Nothing outside the mapping is read.

:func:`remove_segments` deletes a bus's segments; the bus calls it for its own at close and
for those of dead processes when it prunes their graph files.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import glob
import logging
import mmap
import os
import re
import stat
import struct
import sys
import threading
import time
import weakref
from typing import Optional

from robix_planner.wire import SHM_MAX_SLOTS, SHM_NAME_PATTERN, ProtocolError, ShmBlob

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
MAGIC = b"ROBIXSHM"
LAYOUT_VERSION = 1
#: The header page (little-endian): magic, layout version, slot count, slot size, data
#: offset, owner pid (``_HEADER``); generation words (8 bytes per slot) from WORDS_OFFSET;
#: lock bytes (1 per slot) from LOCKS_OFFSET. Slot ``i`` starts at ``DATA_OFFSET + i * slot_bytes``.
DATA_OFFSET = 4096
WORDS_OFFSET = 64
LOCKS_OFFSET = 3072
SLOT_ALIGN = 4096
_HEADER = struct.Struct("<8sIIQQI")  # magic, version, slots, slot_bytes, data_offset, pid
#: struct flock on Linux (x86-64, AArch64 and the other 64-bit ABIs): type, whence, start, len, pid.
_FLOCK = struct.Struct("=hh4xqqi4x")
#: A segment replaced by a bigger one stays this long for descriptors in flight.
RETIRE_S = 1.0
_NAME_RE = re.compile(SHM_NAME_PATTERN)


class StaleBlob(Exception):
    """The slot was rewritten for a newer blob before this one was read: drop the message."""


def supported() -> bool:
    """Shared-memory blobs need Linux: a writable /dev/shm (tmpfs) and OFD locks."""
    return (sys.platform.startswith("linux") and hasattr(fcntl, "F_OFD_SETLK")
            and os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK | os.X_OK))


def segment_path(name: str) -> str:
    return os.path.join(SHM_DIR, name)


def segment_prefix(bus_id: str) -> str:
    """Every segment of one bus is named ``robix-<bus id>-<publisher id>-<n>``."""
    return f"robix-{bus_id}-"


def remove_segments(bus_id: str) -> int:
    """Delete the segments of bus ``bus_id`` (its process left or died); returns how many."""
    if not re.fullmatch(r"[A-Za-z0-9_]{1,64}", bus_id):  # never a glob pattern or a path
        return 0
    removed = 0
    for path in glob.glob(os.path.join(SHM_DIR, glob.escape(segment_prefix(bus_id)) + "*")):
        try:
            if os.lstat(path).st_uid != os.getuid():
                continue
            os.unlink(path)
            removed += 1
        except OSError:  # gone already, or not ours
            continue
    return removed


def _lock(fd: int, kind: int, slot: int) -> bool:
    """Take (F_RDLCK, F_WRLCK) or drop (F_UNLCK) this open file's lock on a slot's byte, never waiting."""
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, LOCKS_OFFSET + slot, 1, 0))
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise


def _round_up(n: int, align: int) -> int:
    return max(align, -(-n // align) * align)


class _Segment:
    """One mapped segment file (writer or reader side)."""

    def __init__(self, name: str, fd: int, mm: mmap.mmap, slots: int, slot_bytes: int):
        self.name, self.fd, self.mm, self.slots, self.slot_bytes = name, fd, mm, slots, slot_bytes
        self.view = memoryview(mm)
        self.words = self.view[WORDS_OFFSET:WORDS_OFFSET + 8 * slots].cast("Q")
        self.leased: set[int] = set()  # reader: slots it holds a lock on (a view is alive)
        self.closing = False
        self._close_lock = threading.Lock()
        self._closed = False

    def slot_offset(self, slot: int) -> int:
        return DATA_OFFSET + slot * self.slot_bytes

    def close(self) -> None:
        """Unmap and close (drops this process's locks); views handed out keep the mapping alive."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self.words.release()
        self.view.release()
        try:
            self.mm.close()
        except BufferError:  # a loaned or leased array still refers to it: unmapped when that goes
            pass
        os.close(self.fd)


# --------------------------------------------------------------------------- writer


class ShmRing:
    """A publisher's ring of blob slots in /dev/shm. Not thread-safe: the publisher's lock guards it.

    ``put(buffer)`` returns the descriptor to send in place of the blob — after copying it into
    a free slot, or with no copy if ``buffer`` is an array :meth:`loan` handed out — or None when
    the blob should travel as a frame (small, not contiguous, no free slot, no shared memory).
    """

    def __init__(self, bus_id: str, publisher_id: str, *, slots: int, min_bytes: int):
        if not 1 <= slots <= SHM_MAX_SLOTS:
            raise ValueError(f"shared-memory slots must be 1..{SHM_MAX_SLOTS}, got {slots}")
        self.prefix = f"{segment_prefix(bus_id)}{publisher_id}-"
        self.slots = slots
        self.min_bytes = min_bytes
        self.written = 0  # blobs committed, over all segments
        self.full = 0  # blobs sent as frames because every slot was leased or loaned
        self.failed = False
        self._count = 0
        self._seg: Optional[_Segment] = None
        self._base = 0  # address of the current mapping
        self._gen = 0
        self._next = 0  # where the search for a free slot starts
        self._loaned: dict[int, tuple[int, int]] = {}  # slot -> (loaned bytes, loan number)
        self._loans = 0
        self._returned: collections.deque = collections.deque()  # (segment, slot, loan number) of dead loans
        self._retired: list[tuple[float, _Segment]] = []

    @property
    def name(self) -> Optional[str]:
        """The current segment's name (None before the first blob)."""
        return self._seg.name if self._seg is not None else None

    def _ensure(self, size: int) -> Optional[_Segment]:
        while self._returned:  # loans dropped without being published: free their slots
            seg, slot, number = self._returned.popleft()
            if seg is self._seg and self._loaned.get(slot, (0, -1))[1] == number:
                del self._loaned[slot]
                seg.words[slot] = 0  # holds nothing
                _lock(seg.fd, fcntl.F_UNLCK, slot)
        if self._retired:
            self._expire(time.monotonic())
        seg = self._seg
        if seg is None or size > seg.slot_bytes:
            # Raw camera frames have one size; JPEG sizes vary: leave room when growing.
            seg = self._create(_round_up(size if seg is None else size + size // 2, SLOT_ALIGN))
        return seg

    def _claim(self, seg: _Segment) -> Optional[int]:
        """A slot that no reader leases and no loan holds, locked for writing; None if there is none."""
        for k in range(seg.slots):
            slot = (self._next + k) % seg.slots
            if slot in self._loaned:
                continue
            if _lock(seg.fd, fcntl.F_WRLCK, slot):
                self._next = (slot + 1) % seg.slots
                seg.words[slot] = (self._gen + 1) << 1 | 1  # being written
                return slot
        self.full += 1
        return None

    def _commit(self, seg: _Segment, slot: int, size: int) -> ShmBlob:
        self._gen += 1
        seg.words[slot] = self._gen << 1
        _lock(seg.fd, fcntl.F_UNLCK, slot)
        self.written += 1
        return ShmBlob(shm=seg.name, slot=slot, offset=seg.slot_offset(slot), size=size, gen=self._gen)

    def loan(self, shape: tuple[int, ...]):
        """A writable uint8 array of ``shape`` in a free slot, to fill and then publish; None if none is free.

        Until published it is the caller's; dropped unpublished, its slot returns to the ring.
        """
        import numpy as np

        nbytes = int(np.prod(shape))
        if self.failed or nbytes < self.min_bytes:
            return None
        seg = self._ensure(nbytes)
        if seg is None:
            return None
        slot = self._claim(seg)
        if slot is None:
            return None
        self._loans += 1
        self._loaned[slot] = (nbytes, self._loans)
        array = np.ndarray(shape, dtype=np.uint8, buffer=seg.mm, offset=seg.slot_offset(slot))
        weakref.finalize(array, self._returned.append, (seg, slot, self._loans))  # any thread: just queue it
        return array

    def put(self, buffer) -> Optional[ShmBlob]:
        if self.failed:
            return None
        try:
            src = memoryview(buffer).cast("B")
        except TypeError:  # not C-contiguous: let ZeroMQ send it as a frame
            return None
        size = src.nbytes
        if size < self.min_bytes:
            return None
        seg = self._ensure(size)
        if seg is None:
            return None
        interface = getattr(buffer, "__array_interface__", None)
        if interface is not None and self._loaned:
            at = interface["data"][0] - self._base - DATA_OFFSET
            slot, rest = divmod(at, seg.slot_bytes)
            if 0 <= at < seg.slots * seg.slot_bytes and rest == 0 and self._loaned.get(slot, (0,))[0] >= size:
                # a loan of this segment, filled in place: no copy
                del self._loaned[slot]
                try:
                    buffer.flags.writeable = False  # readers see it now
                except (AttributeError, ValueError):
                    pass
                return self._commit(seg, slot, size)
        slot = self._claim(seg)
        if slot is None:
            return None
        offset = seg.slot_offset(slot)
        seg.view[offset:offset + size] = src
        return self._commit(seg, slot, size)

    def _create(self, slot_bytes: int) -> Optional[_Segment]:
        self._count += 1
        name = f"{self.prefix}{self._count}"
        path = segment_path(name)
        total = DATA_OFFSET + self.slots * slot_bytes
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            return self._fail(f"cannot create {path}: {exc}")
        try:
            os.fchmod(fd, 0o600)
            os.posix_fallocate(fd, 0, total)  # reserve the pages now: a full /dev/shm fails here, not with SIGBUS
            mm = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            os.close(fd)
            os.unlink(path)
            return self._fail(f"cannot reserve {total / 1e6:.1f} MB in {SHM_DIR}: {exc}")
        mm[:_HEADER.size] = _HEADER.pack(MAGIC, LAYOUT_VERSION, self.slots, slot_bytes, DATA_OFFSET, os.getpid())
        seg = _Segment(name, fd, mm, self.slots, slot_bytes)
        if self._seg is not None:
            self._retired.append((time.monotonic() + RETIRE_S, self._seg))
        self._seg, self._gen, self._next = seg, 0, 0
        self._loaned.clear()  # loans of the old segment are copied from it if published
        import numpy as np

        self._base = np.frombuffer(mm, dtype=np.uint8, count=1).__array_interface__["data"][0]
        log.debug("shared-memory segment %s: %d slots of %d bytes", path, self.slots, slot_bytes)
        return seg

    def _fail(self, why: str) -> None:
        self.failed = True
        log.warning("%s; blobs of this publisher travel in ZeroMQ frames instead", why)
        return None

    def _expire(self, now: float) -> None:
        keep = []
        for deadline, seg in self._retired:
            if deadline <= now:
                _unlink_and_close(seg)
            else:
                keep.append((deadline, seg))
        self._retired = keep

    def close(self) -> None:
        """Remove every segment of this ring. Idempotent."""
        for _, seg in self._retired:
            _unlink_and_close(seg)
        self._retired = []
        if self._seg is not None:
            _unlink_and_close(self._seg)
            self._seg = None
        self._loaned.clear()


def _unlink_and_close(seg: _Segment) -> None:
    try:
        os.unlink(segment_path(seg.name))
    except FileNotFoundError:
        pass
    seg.close()


# --------------------------------------------------------------------------- reader


class _BufferPool:
    """Reusable buffers for blobs copied out: a fresh 0.92 MB allocation page-faults (~0.3 ms).

    A buffer is handed out again only when nothing but the pool refers to it (CPython reference
    counts: a message, a memoryview or a numpy array over it each hold a reference).
    """

    def __init__(self, per_size: int = 4, max_sizes: int = 4):
        self.per_size, self.max_sizes = per_size, max_sizes
        self._pools: collections.OrderedDict[int, list[bytearray]] = collections.OrderedDict()
        self._counts = hasattr(sys, "getrefcount")

    def get(self, size: int) -> bytearray:
        pool = self._pools.get(size)
        if pool is None:
            if len(self._pools) >= self.max_sizes:
                self._pools.popitem(last=False)
            pool = self._pools[size] = []
        else:
            self._pools.move_to_end(size)
        if self._counts:
            for buf in pool:
                if sys.getrefcount(buf) == 3:  # the list, the loop variable, the argument
                    return buf
        buf = bytearray(size)
        if len(pool) < self.per_size:
            pool.append(buf)
        return buf


class ShmReader:
    """A subscriber's read-only mappings of publishers' segments. :meth:`read` runs on one thread
    (the bus IO thread); leases are released from whichever thread drops the last view."""

    def __init__(self, *, max_blob_bytes: int, max_segments: int = 64):
        self.max_blob_bytes = max_blob_bytes
        self.max_segments = max_segments
        self.copied = 0  # blobs copied out rather than leased (lease budget spent)
        self._segments: collections.OrderedDict[str, _Segment] = collections.OrderedDict()
        self._pool = _BufferPool()
        self._uid = os.getuid()

    def resolve(self, msg) -> None:
        """Replace every :class:`ShmBlob` in ``msg``'s blob fields with a read-only view of its bytes."""
        for name in msg.blob_fields:
            ref = getattr(msg, name)
            if isinstance(ref, ShmBlob):
                setattr(msg, name, self.read(ref))

    def read(self, ref: ShmBlob) -> memoryview:
        """A read-only view of the blob ``ref`` names, leased; or a copy. :class:`StaleBlob` or ProtocolError."""
        seg = self._segment(ref.shm)
        if ref.slot >= seg.slots:
            raise ProtocolError(f"shared-memory slot {ref.slot} of {ref.shm}, which has {seg.slots}")
        start = seg.slot_offset(ref.slot)
        if ref.offset < start or ref.offset + ref.size > start + seg.slot_bytes:
            raise ProtocolError(f"blob at {ref.offset}+{ref.size} is outside slot {ref.slot} "
                                f"({start}..{start + seg.slot_bytes}) of {ref.shm}")
        if ref.size > self.max_blob_bytes:
            raise ProtocolError(f"shared-memory blob of {ref.size} bytes; the limit is {self.max_blob_bytes}")
        held = ref.slot in seg.leased  # our lock already keeps this slot as it is
        if not held and not _lock(seg.fd, fcntl.F_RDLCK, ref.slot):
            raise StaleBlob(f"slot {ref.slot} of {ref.shm} is being rewritten")
        try:
            word = seg.words[ref.slot]
            if word != ref.gen << 1:
                if word >> 1 > ref.gen:
                    raise StaleBlob(f"slot {ref.slot} of {ref.shm} moved on to write {word >> 1}")
                raise ProtocolError(f"generation {ref.gen} is not in slot {ref.slot} of {ref.shm} "
                                    f"(it holds {word >> 1}{', being written' if word & 1 else ''})")
            if held or len(seg.leased) >= max(1, seg.slots // 4):
                self.copied += 1
                buf = self._pool.get(ref.size)
                buf[:] = seg.view[ref.offset:ref.offset + ref.size]
                if not held:
                    _lock(seg.fd, fcntl.F_UNLCK, ref.slot)
                elif seg.words[ref.slot] != word:  # our other lease ended during the copy, and the slot moved on
                    raise StaleBlob(f"slot {ref.slot} of {ref.shm} was rewritten while being read")
                return memoryview(buf).toreadonly()
            import numpy as np

            array = np.frombuffer(seg.mm, dtype=np.uint8, count=ref.size, offset=ref.offset)  # read-only
            seg.leased.add(ref.slot)
            weakref.finalize(array, _release, seg, ref.slot)
            return memoryview(array)  # every view or array made from it keeps `array`, so the lease, alive
        except BaseException:
            if not held and ref.slot not in seg.leased:
                _lock(seg.fd, fcntl.F_UNLCK, ref.slot)
            raise

    def _segment(self, name: str) -> _Segment:
        seg = self._segments.get(name)
        if seg is not None:
            self._segments.move_to_end(name)
            return seg
        if not _NAME_RE.match(name):  # decode checked it already; never let a path through
            raise ProtocolError(f"bad shared-memory segment name {name!r}")
        path = segment_path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise ProtocolError(f"cannot open shared-memory segment {path}: {exc.strerror}") from None
        try:
            seg = self._map(name, fd)
        except BaseException:
            os.close(fd)
            raise
        if len(self._segments) >= self.max_segments:
            for old_name, old in list(self._segments.items()):
                if not old.leased:
                    del self._segments[old_name]
                    old.close()
                    break
        self._segments[name] = seg
        return seg

    def _map(self, name: str, fd: int) -> _Segment:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ProtocolError(f"shared-memory segment {name} is not a regular file")
        if st.st_uid != self._uid or st.st_mode & 0o077:
            raise ProtocolError(f"shared-memory segment {name} must belong to uid {self._uid} with mode 0600 "
                                f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")
        if st.st_size < DATA_OFFSET:
            raise ProtocolError(f"shared-memory segment {name} has {st.st_size} bytes, less than its header")
        magic, version, slots, slot_bytes, data_offset, _pid = _HEADER.unpack(os.pread(fd, _HEADER.size, 0))
        if magic != MAGIC or version != LAYOUT_VERSION:
            raise ProtocolError(f"{name} is not a Robix shared-memory segment of layout {LAYOUT_VERSION}")
        if (not 1 <= slots <= SHM_MAX_SLOTS or slot_bytes <= 0 or slot_bytes % SLOT_ALIGN
                or data_offset != DATA_OFFSET or st.st_size != DATA_OFFSET + slots * slot_bytes):
            raise ProtocolError(f"shared-memory segment {name}: inconsistent header ({slots} slots of "
                                f"{slot_bytes} bytes at {data_offset}, file of {st.st_size} bytes)")
        mm = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)  # MAP_SHARED, PROT_READ: read-only views
        return _Segment(name, fd, mm, slots, slot_bytes)

    def prune(self) -> None:
        """Unmap segments their publisher has removed (called every discovery period)."""
        for name, seg in list(self._segments.items()):
            try:
                gone = os.fstat(seg.fd).st_nlink == 0
            except OSError:
                gone = True
            if gone:
                del self._segments[name]
                _retire(seg)

    @property
    def mapped(self) -> list[str]:
        return list(self._segments)

    def close(self) -> None:
        """Unmap every segment; one with views still alive goes when its last view does."""
        for seg in self._segments.values():
            _retire(seg)
        self._segments.clear()


def _retire(seg: _Segment) -> None:
    seg.closing = True
    if not seg.leased:
        seg.close()


def _release(seg: _Segment, slot: int) -> None:
    """The last view of a leased slot is gone (any thread): unlock it for the publisher."""
    if not seg._closed:
        _lock(seg.fd, fcntl.F_UNLCK, slot)
    seg.leased.discard(slot)
    if seg.closing and not seg.leased:
        seg.close()
