"""Transport benchmark: 640x480 RGB frames over loopback TCP and IPC, and a small Command's codec.

    python bench/transport.py              # about 3 minutes on 2 cores
    python bench/transport.py --quick      # one round of short runs, for a smoke test

For each transport (tcp, ipc) and method, a publisher process and a subscriber process
(multiprocessing, spawn; numpy/BLAS limited to one thread; ``--pin-cores`` also pins
each process to its own core) exchange frames:

* ``robix bus shm``  the real Bus -> Publisher -> Subscription path (discovery, XPUB, IO
  thread, wire.decode), latest policy, with shared-memory blobs (``bus.shm=auto``, the
  default): ``publish(Image)`` copies the pixels into a slot of the publisher's ring in
  /dev/shm, the envelope with a descriptor goes over the socket, and the subscriber gets a
  read-only view of the slot (leased: no copy);
* ``robix bus shm loan``  the same with no copy at all: the frame is produced into a slot
  ``Publisher.loan`` hands out (here ``np.copyto`` of the test frame stands for the camera
  writing it; the clock starts after it, as it starts after the frame exists for the others);
* ``robix bus``   the same path with ``bus.shm=off``: the pixels travel in a ZeroMQ frame
  through the socket; and ``robix bus reliable`` (throughput only): the reliable policy,
  where nothing may be dropped (reliable publishers never use shared memory);
* ``robix wire``  wire.encode / wire.decode (pixels as their own zero-copy frame) over a
  bare XPUB/SUB pair;
* ``zmq bytes``   the floor: no codec at all, ``[topic, 16-byte stamp, pixels]`` over the same bare pair;
* ``pickle``      baselines over the same bare sockets: ``pickle.dumps({"stamp_ns", "pixels": array})``;
* ``json+b64``    and a JSON object with the pixels in base64.

Throughput: the publisher sends as fast as it can; the subscriber counts what it received
and decoded per second (latest-only sockets may drop what it cannot take: that is the
policy, and the "dropped" column says how much). Latency: paced sends (time.sleep pacing,
``--rate`` frames/s, or half the method's measured throughput if that is lower); each
message carries its send time (``stamp_ns``, taken before encoding) and the subscriber
subtracts it from the time after decoding: one-way latency including both codecs.
The reliable row instead times a burst of BATCH frames that must all arrive (no drops,
no gaps). Each cell is the median over ``--rounds`` rounds; a round runs every cell once
(a fresh pair of processes, a warm-up, one measured window), so a slow phase of a shared
machine hits all methods alike. Ratios are of the medians, against the JSON+base64
baseline of the same transport. The last table: a small Command's encode + decode, ours
(wire.encode + wire.decode, validated) against pickle and JSON (which decode to unvalidated
objects).
"""

from __future__ import annotations

import os

# One thread per library in this process and (inherited) in the spawned children, set
# before numpy is imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Callable, Optional  # noqa: E402

import msgspec  # noqa: E402
import numpy as np  # noqa: E402
import zmq  # noqa: E402

from robix_planner import wire  # noqa: E402
from robix_planner.bus import Bus, BusConfig  # noqa: E402
from robix_planner.messages import Command, Image, ImageEncoding  # noqa: E402

WIDTH, HEIGHT = 640, 480
FRAME_BYTES = WIDTH * HEIGHT * 3
TOPIC = "/camera/bench"
BARE_HWM = 4  # frames queued per bare socket, like the bus's latest policy (2) plus slack
SHM_METHODS = ("robix bus shm", "robix bus shm loan")
BUS_METHODS = SHM_METHODS + ("robix bus", "robix bus reliable")
BARE_METHODS = ("robix wire", "zmq bytes", "pickle", "json+b64")
METHODS = BUS_METHODS + BARE_METHODS
STARTUP_TIMEOUT_S = 20.0
#: Frames in the reliable burst: below the reliable queue bound, so none may be lost. The
#: subscriber may buffer the whole burst (BATCH * 0.92 MB) while it catches up.
BATCH = 1000


# --------------------------------------------------------------------------- codecs (bare sockets)


def _robix_sender(sock: zmq.Socket, pixels: np.ndarray) -> Callable[[int], None]:
    def send(seq: int) -> None:
        msg = Image(camera="bench", width=WIDTH, height=HEIGHT, encoding=ImageEncoding.RGB8,
                    stamp_ns=time.time_ns(), data=pixels)
        sock.send_multipart(wire.encode(TOPIC, msg, src="bench", seq=seq), copy=False)
    return send


def _bytes_sender(sock: zmq.Socket, pixels: np.ndarray) -> Callable[[int], None]:
    topic = TOPIC.encode()

    def send(seq: int) -> None:
        sock.send_multipart([topic, struct.pack("<qq", time.time_ns(), seq), pixels], copy=False)
    return send


def _pickle_sender(sock: zmq.Socket, pixels: np.ndarray) -> Callable[[int], None]:
    topic = TOPIC.encode()

    def send(seq: int) -> None:
        payload = pickle.dumps({"stamp_ns": time.time_ns(), "seq": seq, "pixels": pixels},
                               protocol=pickle.HIGHEST_PROTOCOL)
        sock.send_multipart([topic, payload], copy=False)
    return send


def _json_sender(sock: zmq.Socket, pixels: np.ndarray) -> Callable[[int], None]:
    topic = TOPIC.encode()

    def send(seq: int) -> None:
        stamp = time.time_ns()
        payload = json.dumps({"type": "image", "camera": "bench", "width": WIDTH, "height": HEIGHT,
                              "encoding": "rgb8", "stamp_ns": stamp, "seq": seq,
                              "data": base64.b64encode(pixels).decode("ascii")}).encode()
        sock.send_multipart([topic, payload], copy=False)
    return send


def _robix_decode(frames) -> int:
    msg = wire.decode(frames).msg
    msg.array()  # the (H, W, 3) view a consumer uses
    return msg.stamp_ns


def _bytes_decode(frames) -> int:
    np.frombuffer(frames[2].buffer, dtype=np.uint8).reshape(HEIGHT, WIDTH, 3)
    return struct.unpack("<qq", frames[1].bytes)[0]


def _pickle_decode(frames) -> int:
    obj = pickle.loads(frames[1].buffer)  # our own processes only: never unpickle what a peer sends
    assert obj["pixels"].shape == (HEIGHT, WIDTH, 3)
    return obj["stamp_ns"]


def _json_decode(frames) -> int:
    obj = json.loads(frames[1].bytes)
    pixels = np.frombuffer(base64.b64decode(obj["data"]), dtype=np.uint8).reshape(obj["height"], obj["width"], 3)
    assert pixels.nbytes == FRAME_BYTES
    return obj["stamp_ns"]


SENDERS = {"robix wire": _robix_sender, "zmq bytes": _bytes_sender, "pickle": _pickle_sender, "json+b64": _json_sender}
DECODERS = {"robix wire": _robix_decode, "zmq bytes": _bytes_decode, "pickle": _pickle_decode, "json+b64": _json_decode}


# --------------------------------------------------------------------------- processes


def _pin(cpu: Optional[int]) -> None:
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {cpu})


def _bus(workdir: str, transport: str, tune: dict, name: str, method: str) -> Bus:
    extra = {} if tune.get("latest_hwm") is None else {"latest_hwm": tune["latest_hwm"]}
    shm = "auto" if method in SHM_METHODS else "off"
    bus = Bus(BusConfig(graph_dir=workdir, domain="bench", transport=transport, discovery_period_s=0.05, shm=shm,
                        **extra), name=name)
    if tune.get("sockbuf"):  # an experiment: kernel socket buffers for every socket the bus creates from now on
        bus.ctx.setsockopt(zmq.SNDBUF, tune["sockbuf"])
        bus.ctx.setsockopt(zmq.RCVBUF, tune["sockbuf"])
    return bus


def _bare_socket(kind: int, tune: dict) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM if kind == zmq.XPUB else zmq.RCVHWM, BARE_HWM)
    if tune.get("sockbuf"):
        sock.setsockopt(zmq.SNDBUF if kind == zmq.XPUB else zmq.RCVBUF, tune["sockbuf"])
    return ctx, sock


def _bare_endpoint(workdir: str, transport: str) -> str:
    return f"ipc://{workdir}/bare.sock" if transport == "ipc" else "tcp://127.0.0.1:*"


def publisher_main(conn, method: str, transport: str, workdir: str, cpu: Optional[int], mode: str,
                   rate_hz: float, warmup_s: float, measure_s: float, tune: dict) -> None:
    """Send frames: unpaced (throughput) or paced (latency); report the measurement interval."""
    _pin(cpu)
    pixels = np.random.default_rng(0).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    closers = []
    if method in BUS_METHODS:
        bus = _bus(workdir, transport, tune, "bench_pub", method)
        closers.append(bus.close)
        pub = bus.publisher(TOPIC, Image, policy="reliable" if method.endswith("reliable") else "latest")
        if not pub.wait_for_subscribers(1, timeout_s=STARTUP_TIMEOUT_S):
            conn.send(("error", "no subscriber"))
            return
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while method in SHM_METHODS and not pub.uses_shm:  # the graph scan that allows it
            if time.monotonic() > deadline:
                conn.send(("error", "shared memory never enabled"))
                return
            time.sleep(0.01)

        loan = method == "robix bus shm loan"

        def send(seq: int) -> None:
            frame = pixels
            if loan:
                frame = pub.loan((HEIGHT, WIDTH, 3))
                np.copyto(frame, pixels)  # the camera writes the frame into the slot: before the clock starts
            pub.publish(Image(camera="bench", width=WIDTH, height=HEIGHT, encoding=ImageEncoding.RGB8,
                              stamp_ns=time.time_ns(), data=frame))
    else:
        ctx, sock = _bare_socket(zmq.XPUB, tune)
        sock.bind(_bare_endpoint(workdir, transport))
        closers += [lambda: sock.close(linger=0), ctx.term]
        conn.send(("endpoint", sock.getsockopt(zmq.LAST_ENDPOINT).decode()))
        if not sock.poll(STARTUP_TIMEOUT_S * 1000):
            conn.send(("error", "no subscriber"))
            return
        sock.recv()  # the subscription
        send = SENDERS[method](sock, pixels)

    if mode == "batch":  # reliable: a burst of frames that all must arrive, timed at the subscriber
        time.sleep(warmup_s)
        t0 = time.monotonic()
        for seq in range(1, BATCH + 1):
            send(seq)
        conn.send(("done", t0, None, BATCH))
        conn.recv()
        for close in closers:
            close()
        return

    seq = 0
    period = 1.0 / rate_hz if mode == "latency" else 0.0
    start = time.monotonic()
    t_measure, t_end = start + warmup_s, start + warmup_s + measure_s
    next_t = start
    seq_at_measure = None
    while True:
        now = time.monotonic()
        if now >= t_end:
            break
        if seq_at_measure is None and now >= t_measure:
            seq_at_measure = seq
        if period:
            next_t += period
            if next_t > now:
                time.sleep(next_t - now)
        seq += 1
        send(seq)
    conn.send(("done", t_measure, t_end, seq - (seq_at_measure or 0)))
    conn.recv()  # parent: the subscriber has what it will get; close now
    for close in closers:
        close()


def subscriber_main(conn, method: str, transport: str, workdir: str, cpu: Optional[int],
                    tune: dict) -> None:
    """Receive and decode; record (receive time, one-way latency) per frame until told to stop."""
    _pin(cpu)
    recv_t: list[float] = []
    lat_ns: list[int] = []
    if method in BUS_METHODS:
        bus = _bus(workdir, transport, tune, "bench_sub", method)

        def deliver(_sub, rec) -> None:
            rec.msg.array()
            lat_ns.append(time.time_ns() - rec.msg.stamp_ns)
            recv_t.append(time.monotonic())
            if len(recv_t) == BATCH and method.endswith("reliable"):
                conn.send(("complete",))

        bus.subscribe(TOPIC, Image, deliver, policy="reliable" if method.endswith("reliable") else "latest")
        conn.send(("ready",))
        conn.recv()  # "stop"
        stats = bus.stats.as_dict()
        bus.close()
    else:
        decode = DECODERS[method]
        ctx, sock = _bare_socket(zmq.SUB, tune)
        sock.setsockopt(zmq.SUBSCRIBE, TOPIC.encode())
        conn.send(("ready",))
        sock.connect(conn.recv())
        stats = {}
        while not conn.poll():
            if not sock.poll(20):
                continue
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                stamp = decode(frames)
                lat_ns.append(time.time_ns() - stamp)
                recv_t.append(time.monotonic())
        conn.recv()
        sock.close(linger=0)
        ctx.term()
    conn.send(("result", np.asarray(recv_t), np.asarray(lat_ns, dtype=np.int64), stats))


def _expect(conn, kind: str, timeout_s: float):
    if not conn.poll(timeout_s):
        raise RuntimeError(f"benchmark process sent no {kind!r} within {timeout_s} s")
    msg = conn.recv()
    if msg[0] != kind:
        raise RuntimeError(f"benchmark process: expected {kind!r}, got {msg!r}")
    return msg


def run_pair(method: str, transport: str, mode: str, *, rate_hz: float, warmup_s: float, window_s: float,
             repeats: int = 1, pin: bool = False, tune: Optional[dict] = None) -> dict:
    """One publisher and one subscriber process; returns per-window rates and latency percentiles."""
    ctx = mp.get_context("spawn")
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    pub_cpu, sub_cpu = (cpus[0], cpus[1]) if pin and len(cpus) >= 2 else (None, None)
    workdir = tempfile.mkdtemp(prefix="robix-bench-")
    pub_conn, pub_child = ctx.Pipe()
    sub_conn, sub_child = ctx.Pipe()
    sub = ctx.Process(target=subscriber_main, args=(sub_child, method, transport, workdir, sub_cpu, tune or {}),
                      daemon=True)
    pub = ctx.Process(target=publisher_main, args=(pub_child, method, transport, workdir, pub_cpu, mode, rate_hz,
                                                   warmup_s, window_s * repeats, tune or {}), daemon=True)
    try:
        sub.start()
        pub.start()
        _expect(sub_conn, "ready", STARTUP_TIMEOUT_S)
        if method in BARE_METHODS:
            sub_conn.send(_expect(pub_conn, "endpoint", STARTUP_TIMEOUT_S)[1])
        _, t0, t1, sent = _expect(pub_conn, "done", STARTUP_TIMEOUT_S + warmup_s + window_s * repeats + 10)
        if mode == "batch":
            _expect(sub_conn, "complete", 30)
        else:
            time.sleep(0.3)  # let the last frames arrive
        sub_conn.send("stop")
        _, recv_t, lat_ns, stats = _expect(sub_conn, "result", 30)
        pub_conn.send("close")
        pub.join(10)
        sub.join(10)
    finally:
        for proc in (pub, sub):
            if proc.is_alive():
                proc.kill()
                proc.join()
        shutil.rmtree(workdir, ignore_errors=True)

    if mode == "batch":
        elapsed = recv_t[-1] - t0
        return {"fps": len(recv_t) / elapsed, "sent_fps": sent / elapsed, "received": int(len(recv_t)),
                "sent": int(sent), "gaps": stats.get("gaps", 0), "p50_us": float("nan"), "p99_us": float("nan"),
                "shm_received": stats.get("shm_received", 0), "shm_stale": stats.get("shm_stale", 0)}
    edges = np.linspace(t0, t1, repeats + 1)
    fps, p50, p99 = [], [], []
    for a, b in zip(edges, edges[1:]):
        inside = (recv_t >= a) & (recv_t < b)
        fps.append(inside.sum() / (b - a))
        if inside.any():
            p50.append(float(np.percentile(lat_ns[inside], 50)) / 1e3)
            p99.append(float(np.percentile(lat_ns[inside], 99)) / 1e3)
    return {
        "fps": statistics.median(fps),
        "p50_us": statistics.median(p50) if p50 else float("nan"),
        "p99_us": statistics.median(p99) if p99 else float("nan"),
        "sent_fps": sent / (t1 - t0),
        "received": int(((recv_t >= t0) & (recv_t < t1)).sum()),
        "sent": int(sent),
        "gaps": stats.get("gaps", 0),
        "shm_received": stats.get("shm_received", 0),
        "shm_stale": stats.get("shm_stale", 0),
    }


# --------------------------------------------------------------------------- small command codec


def command_codec_us(repeats: int = 25, number: int = 2000) -> dict[str, float]:
    """Median µs for one encode + decode of a small Command, ours vs pickle and JSON."""
    cmd = Command(id="3f2a9c1b7d4e", text="put the red cup into the bus tub", skill="put_into",
                  args={"object": "red cup", "receptacle": "bus tub"}, stamp_ns=1_760_000_000_000_000_000)
    as_dict = msgspec.to_builtins(cmd)

    def ours():
        wire.decode(wire.encode("/controller/command", cmd, src="0123456789abcdef", seq=42))

    def pickled():
        pickle.loads(pickle.dumps(cmd, protocol=pickle.HIGHEST_PROTOCOL))

    def jsoned():
        json.loads(json.dumps(as_dict))

    out = {}
    for name, fn in (("robix wire", ours), ("pickle", pickled), ("json", jsoned)):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter_ns()
            for _ in range(number):
                fn()
            times.append((time.perf_counter_ns() - t) / number / 1e3)
        out[name] = statistics.median(times)
    return out


# --------------------------------------------------------------------------- main


def _fmt(x: float, digits: int = 0) -> str:
    return "-" if x != x else f"{x:,.{digits}f}"


def _median(rows: list[dict], key: str) -> float:
    values = [r[key] for r in rows if r.get(key) == r.get(key)]  # skip NaN
    return statistics.median(values) if values else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transports", nargs="+", default=["tcp", "ipc"], choices=["tcp", "ipc"])
    parser.add_argument("--rate", type=float, default=300.0, help="paced frames/s for the latency runs")
    parser.add_argument("--window", type=float, default=1.0, help="seconds measured per throughput run")
    parser.add_argument("--latency-window", type=float, default=1.5, help="seconds measured per latency run")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds; each round runs every cell once, interleaved (the table shows medians)")
    parser.add_argument("--warmup", type=float, default=0.3)
    parser.add_argument("--pin-cores", action="store_true",
                        help="pin the publisher and the subscriber process to one core each (each process's "
                             "ZeroMQ IO thread then competes with its Python thread; slower on 2 cores)")
    parser.add_argument("--quick", action="store_true", help="one round of 0.5 s runs, for a smoke test")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                        help=f"subset of: {', '.join(repr(m) for m in METHODS)} (json+b64 is always run: the baseline)")
    parser.add_argument("--latest-hwm", type=int, default=None,
                        help="override BusConfig.latest_hwm for the bus runs (an experiment; default: the bus's)")
    parser.add_argument("--sockbuf", type=int, default=None, metavar="BYTES",
                        help="set SO_SNDBUF/SO_RCVBUF on every socket (an experiment; default: the OS's)")
    args = parser.parse_args(argv)
    if args.quick:
        args.window, args.latency_window, args.rounds = 0.5, 0.5, 1
    t_start = time.monotonic()
    kw = dict(warmup_s=args.warmup, window_s=args.window, repeats=1, pin=args.pin_cores,
              tune={"latest_hwm": args.latest_hwm, "sockbuf": args.sockbuf})
    methods = [m for m in METHODS if m in args.methods or m == "json+b64"]

    print(f"# transport benchmark: {WIDTH}x{HEIGHT} rgb8 frames ({FRAME_BYTES / 1e6:.2f} MB), "
          f"{os.cpu_count()} CPUs, pyzmq {zmq.__version__} / libzmq {zmq.zmq_version()}, python {sys.version.split()[0]}",
          flush=True)
    runs: dict[tuple[str, str], list[dict]] = {(t, m): [] for t in args.transports for m in methods}
    stale: dict[tuple[str, str], int] = {key: 0 for key in runs}
    for round_no in range(1, args.rounds + 1):
        for transport in args.transports:
            for method in methods:
                mode = "batch" if method == "robix bus reliable" else "throughput"
                row = run_pair(method, transport, mode, rate_hz=0, **kw)
                row["dropped"] = max(0.0, 1 - row["fps"] / row["sent_fps"]) if row["sent_fps"] > 0 else 0.0
                lat = {}
                if mode == "throughput":
                    rate = min(args.rate, 0.5 * row["fps"])
                    lat = run_pair(method, transport, "latency", rate_hz=rate, **{**kw, "window_s": args.latency_window})
                    row.update(p50_us=lat["p50_us"], p99_us=lat["p99_us"], rate=rate)
                else:
                    row.update(rate=float("nan"))
                via_shm = row["shm_received"] + lat.get("shm_received", 0)
                if (method in SHM_METHODS) != (via_shm > 0):
                    raise RuntimeError(f"{method} over {transport}: {via_shm} frames came through shared memory")
                stale[transport, method] += row["shm_stale"] + lat.get("shm_stale", 0)
                runs[transport, method].append(row)
                print(f"  round {round_no} {transport:3} {method:18} {row['fps']:8,.0f} frames/s  "
                      f"p50 {_fmt(row['p50_us'])} µs  p99 {_fmt(row['p99_us'])} µs"
                      + (f"  (shm: {via_shm} frames, {row['shm_stale'] + lat.get('shm_stale', 0)} stale)"
                         if via_shm else ""), file=sys.stderr, flush=True)

    print()
    print("| transport | method | frames/s | (min-max) | GB/s | dropped | vs JSON | paced at /s | p50 µs | p99 µs "
          "| (max) | vs JSON (p50) | p99 <= 1 ms |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for transport in args.transports:
        base = runs[transport, "json+b64"]
        base_fps, base_p50 = _median(base, "fps"), _median(base, "p50_us")
        for method in methods:
            rs = runs[transport, method]
            fps, p50 = _median(rs, "fps"), _median(rs, "p50_us")
            x_p50 = base_p50 / p50
            p99s = [r["p99_us"] for r in rs if r["p99_us"] == r["p99_us"]]
            verdict = "-" if not p99s else ("every round" if max(p99s) <= 1000 else
                                            "median" if _median(rs, "p99_us") <= 1000 else "missed")
            print(f"| {transport} | {method} | {_fmt(fps)} | {_fmt(min(r['fps'] for r in rs))}-"
                  f"{_fmt(max(r['fps'] for r in rs))} | {fps * FRAME_BYTES / 1e9:.2f} | {_median(rs, 'dropped'):.0%} "
                  f"| {fps / base_fps:.1f}x | {_fmt(_median(rs, 'rate'))} | {_fmt(p50)} | {_fmt(_median(rs, 'p99_us'))} "
                  f"| {_fmt(max(p99s) if p99s else float('nan'))} | {_fmt(x_p50, 1)}{'x' if x_p50 == x_p50 else ''} "
                  f"| {verdict} |")

    codec = command_codec_us()
    print()
    print("| small Command, encode + decode | median µs | vs JSON |")
    print("|---|---:|---:|")
    for name, us in codec.items():
        print(f"| {name} | {us:.2f} | {codec['json'] / us:.1f}x |")
    print()
    print(f"medians over {args.rounds} interleaved round(s) of {args.window:g} s (throughput) and "
          f"{args.latency_window:g} s (latency) runs after {args.warmup:g} s warm-up "
          f"(the reliable row: a burst of {BATCH} frames); 'dropped': frames sent that never arrived "
          f"(latest-only sockets discard what the subscriber cannot take); '(max)': the worst round's p99; "
          f"'p99 <= 1 ms': met in every round, at the median only, or missed; shared-memory blobs overwritten "
          f"before the subscriber read them (dropped, counted in 'dropped'): "
          + ", ".join(f"{t} {m.removeprefix('robix bus ')} {stale[t, m]}" for t in args.transports for m in SHM_METHODS
                      if (t, m) in stale)
          + f"; total {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
