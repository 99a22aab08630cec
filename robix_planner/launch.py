"""``robix launch FILE``: start a graph of nodes as processes, like ``ros2 launch``.

A launch file is YAML data (format in docs/launch.md)::

    bus: {domain: lab}                 # optional: bus settings given to every node
    shutdown_grace_s: 5                # optional: SIGINT -> SIGTERM delay when stopping
    nodes:
      - name: camera
        node: robix_planner.demo:CameraNode    # run as `robix run TARGET --name NAME`
        params: {rate_hz: 10}
        remap: {/camera/head: /cam}
        restart: on-failure            # never | on-failure | always
        max_restarts: 3
      - name: commander
        node: robix_planner.demo:DemoCommander
        required: true                 # when it exits, the whole graph stops
      - name: recorder
        cmd: [robix, record, -o, out.mcap]     # or any command

Every node runs as its own child process in its own process group; each line it writes
is prefixed with ``[name]``. A crashed node is restarted per its policy, with a backoff.
The graph comes down on Ctrl-C/SIGTERM, on ``--timeout-s``, or when a required node
exits: SIGINT to every process group, SIGTERM after ``shutdown_grace_s``, SIGKILL
2 s later. On Linux the children also get SIGTERM from the kernel if the launcher itself
dies (``PR_SET_PDEATHSIG``).

Exit code: the required node's code when it ended the graph (0 when it succeeded, its
code or 1 when it failed), 0 or 1 when every node exited by itself (1 if any failed),
124 on ``--timeout-s``, 128+N on signal N (130 for Ctrl-C), 2 for an invalid launch file.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Literal, Optional, Sequence

import msgspec
import yaml

from robix_planner.config import Config, ConfigError, apply_overrides, parse_override, read_yaml

log = logging.getLogger(__name__)

RestartPolicy = Literal["never", "on-failure", "always"]

#: Delay between SIGTERM and SIGKILL when the graph comes down.
KILL_AFTER_TERM_S = 2.0
#: Longest delay between two restarts of one node (the backoff doubles up to this).
MAX_RESTART_DELAY_S = 10.0
#: Exit code when ``--timeout-s`` ran out (as coreutils ``timeout``).
TIMEOUT_EXIT_CODE = 124


class LaunchNode(Config):
    """One process of the graph: a robix node class (``node``) or any command (``cmd``)."""

    #: Unique in the file; the node's name on the bus and its log prefix.
    name: str
    #: ``package.module:ClassName`` of a :class:`robix_planner.node.Node` subclass.
    node: Optional[str] = None
    #: Any command, as a list (``[robix, record, -o, out.mcap]``); ``robix`` runs this venv's robix.
    cmd: Optional[list[str]] = None
    #: The node class's Params (``node`` entries only).
    params: dict = {}
    #: Topic renames, ``{/from: /to}`` (``node`` entries only).
    remap: dict[str, str] = {}
    #: Extra environment variables for this process.
    env: dict[str, str] = {}
    restart: RestartPolicy = "never"
    #: Restarts allowed in the whole run; after that the node stays down.
    max_restarts: int = 3
    #: Delay before the first restart; doubles on each further restart (up to 10 s).
    restart_delay_s: float = 0.5
    #: When this node exits for good (restarts exhausted), stop the whole graph.
    required: bool = False


class LaunchFile(Config):
    """A launch file: the graph's nodes and settings shared by all of them."""

    nodes: list[LaunchNode]
    #: :class:`robix_planner.bus.BusConfig` keys given to every node (``domain``, ``transport``, ...).
    bus: dict = {}
    #: When stopping: SIGINT, then SIGTERM after this many seconds, then SIGKILL 2 s later.
    shutdown_grace_s: float = 5.0


# --------------------------------------------------------------------------- loading

_NAME_OK = re.compile(r"^[A-Za-z0-9_.\-]+$")
_AT = re.compile(r" - at `\$(.*)`$")
_NODE_PATH = re.compile(r"^\.nodes\[(\d+)\](.*)$")


def _field_names(cls) -> list[str]:
    return [f.name for f in msgspec.structs.fields(cls)]


def _explain(exc: msgspec.ValidationError, tree: dict, source: str) -> str:
    """Turn a msgspec error into one that names the node and key and says what to change."""
    text = str(exc)
    m = _AT.search(text)
    where, what = (m.group(1), text[: m.start()]) if m else ("", text)
    cls, prefix = LaunchFile, ""
    nm = _NODE_PATH.match(where)
    if nm:
        idx, rest = int(nm.group(1)), nm.group(2)
        entry = tree["nodes"][idx] if isinstance(tree.get("nodes"), list) else None
        label = f" ({entry['name']!r})" if isinstance(entry, dict) and "name" in entry else ""
        cls, prefix, where = LaunchNode, f"nodes[{idx}]{label}", rest
    where = where.lstrip(".")
    location = " ".join(part for part in (prefix, where) if part) or "top level"
    hint = f"valid keys of {'a node entry' if cls is LaunchNode else 'a launch file'}: {', '.join(_field_names(cls))}"
    unknown = re.match(r"Object contains unknown field `(.+)`", what)
    if unknown:
        close = difflib.get_close_matches(unknown.group(1), _field_names(cls), n=1)
        fix = f"did you mean {close[0]!r}? " if close else "remove it; "
        return f"{source}: {location}: unknown key {unknown.group(1)!r}; {fix}{hint}"
    if what.startswith("Invalid enum value") and where == "restart":
        return f"{source}: {location}: {what}; use one of never, on-failure, always"
    return f"{source}: {location}: {what}; {hint}"


def _apply_launch_overrides(tree: dict, overrides: Sequence[str]) -> None:
    """Dotted overrides; ``nodes.NAME.key=value`` addresses a node by name."""
    for item in overrides:
        path, _value = parse_override(item)
        if path[0] != "nodes":
            apply_overrides(tree, [item])
            continue
        if len(path) < 3:
            raise ConfigError(f"override {item!r} must look like nodes.NAME.key=value, e.g. nodes.camera.params.rate_hz=5")
        nodes = tree.get("nodes") if isinstance(tree.get("nodes"), list) else []
        target = next((n for n in nodes if isinstance(n, dict) and n.get("name") == path[1]), None)
        if target is None:
            names = ", ".join(str(n.get("name")) for n in nodes if isinstance(n, dict))
            raise ConfigError(f"override {item!r}: no node named {path[1]!r} in the launch file (nodes: {names})")
        apply_overrides(target, [".".join(path[2:]) + "=" + item.split("=", 1)[1]])


def load_launch(path: str | os.PathLike, overrides: Sequence[str] = ()) -> LaunchFile:
    """Read and validate a launch file; every fault is a :class:`ConfigError` saying what to change."""
    source = str(path)
    tree = read_yaml(path)
    _apply_launch_overrides(tree, overrides)
    if not isinstance(tree.get("nodes"), list) or not tree["nodes"]:
        raise ConfigError(f"{source}: `nodes` must be a non-empty list; each entry has a name and either node: or cmd:")
    try:
        launch = msgspec.convert(tree, LaunchFile)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(exc, tree, source)) from None
    check_launch(launch, source)
    return launch


def check_launch(launch: LaunchFile, source: str = "launch file") -> None:
    """Checks msgspec cannot express: one of node/cmd, unique names, sane numbers, a valid bus section."""
    from robix_planner.bus import BusConfig
    from robix_planner.config import convert

    if launch.shutdown_grace_s <= 0:
        raise ConfigError(f"{source}: shutdown_grace_s must be > 0, got {launch.shutdown_grace_s}")
    convert(BusConfig, launch.bus, source=f"{source}: bus")
    seen: set[str] = set()
    for i, n in enumerate(launch.nodes):
        where = f"{source}: nodes[{i}] ({n.name!r})"
        if not _NAME_OK.match(n.name):
            raise ConfigError(f"{where}: a name may use letters, digits, '_', '-' and '.' only")
        if n.name in seen:
            raise ConfigError(f"{where}: another node is already named {n.name!r}; names must be unique")
        seen.add(n.name)
        if (n.node is None) == (n.cmd is None):
            raise ConfigError(f"{where}: give exactly one of node: (package.module:Class) or cmd: ([program, args...])")
        if n.node is not None and (":" not in n.node or not all(n.node.partition(":")[::2])):
            raise ConfigError(f"{where}: node: {n.node!r} must look like package.module:ClassName")
        if n.cmd is not None:
            if not n.cmd or not n.cmd[0]:
                raise ConfigError(f"{where}: cmd: must be a non-empty list like [robix, record, -o, out.mcap]")
            if n.params or n.remap:
                raise ConfigError(f"{where}: params: and remap: apply to node: entries only; "
                                  "put a command's options in its cmd: list")
        for a, b in n.remap.items():
            if not (a.startswith("/") and b.startswith("/")):
                raise ConfigError(f"{where}: remap {a!r}: {b!r}: both topics must start with '/'")
        if n.max_restarts < 0:
            raise ConfigError(f"{where}: max_restarts must be >= 0, got {n.max_restarts}")
        if n.restart_delay_s < 0:
            raise ConfigError(f"{where}: restart_delay_s must be >= 0, got {n.restart_delay_s}")


def node_argv(spec: LaunchNode, config_path: Optional[str]) -> list[str]:
    """The command line of one graph process (``python -m robix_planner.cli run ...`` for nodes)."""
    robix = [sys.executable, "-m", "robix_planner.cli"]
    if spec.cmd is not None:
        return robix + spec.cmd[1:] if spec.cmd[0] == "robix" else list(spec.cmd)
    argv = robix + ["run", spec.node, "--name", spec.name]
    if config_path:
        argv += ["--config", config_path]
    for a, b in spec.remap.items():
        argv += ["--remap", f"{a}:={b}"]
    return argv


def _check_runnable(launch: LaunchFile, source: str) -> None:
    """Catch a typo in a module or program name before anything starts."""
    import importlib.util

    for i, n in enumerate(launch.nodes):
        where = f"{source}: nodes[{i}] ({n.name!r})"
        if n.node is not None:
            module = n.node.partition(":")[0]
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):
                found = False
            if not found:
                raise ConfigError(f"{where}: cannot find module {module!r} for node: {n.node!r}; "
                                  "check the spelling or install the package that provides it")
        elif n.cmd[0] != "robix" and shutil.which(n.cmd[0]) is None:
            raise ConfigError(f"{where}: program {n.cmd[0]!r} is not on PATH (use an absolute path)")


# --------------------------------------------------------------------------- processes

_COLOURS = ("36", "33", "35", "32", "34", "91", "96", "93", "95", "92")


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _pdeathsig_setup():
    """A preexec_fn giving the child SIGTERM when the launcher dies (Linux), or None.

    The kernel sends it when the *thread* that forked the child exits: every child is
    started from the launcher's main thread, which lives until the graph is down.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before fork: nothing to load in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    pr_set_pdeathsig = 1

    def setup() -> None:
        prctl(ctypes.c_int(pr_set_pdeathsig), ctypes.c_ulong(signal.SIGTERM), ctypes.c_ulong(0),
              ctypes.c_ulong(0), ctypes.c_ulong(0))
        if os.getppid() != parent:  # the launcher died before prctl took effect
            os._exit(1)

    return setup


def _killpg(pid: int, sig: int) -> bool:
    """Signal the process group led by ``pid``; False if it no longer exists."""
    try:
        os.killpg(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


class _Child:
    """One entry of the launch file, across its restarts."""

    def __init__(self, spec: LaunchNode, argv: list[str], env: dict[str, str], colour: Optional[str]):
        self.spec, self.argv, self.env, self.colour = spec, argv, env, colour
        self.proc: Optional[subprocess.Popen] = None
        self.pids: list[int] = []
        self.restarts = 0
        self.start_at: Optional[float] = 0.0  # when to (re)start; None: not scheduled
        self.finished = False  # will not run again
        self.last_code: Optional[int] = None
        self.readers: list[threading.Thread] = []

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Launcher:
    """Runs a :class:`LaunchFile` until it ends; :meth:`run` returns the exit code.

    Call from the main thread (it installs SIGINT/SIGTERM/SIGHUP handlers for the run).
    """

    def __init__(self, launch: LaunchFile, *, timeout_s: Optional[float] = None, colour: str = "auto",
                 log_level: Optional[str] = None, stdout: Optional[IO[str]] = None, stderr: Optional[IO[str]] = None):
        self.launch = launch
        self.timeout_s = timeout_s
        self.log_level = log_level
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self.colour_mode = colour
        self.children: list[_Child] = []
        self._out_lock = threading.Lock()
        self._wake = threading.Event()
        self._signals: list[int] = []
        self._stop_code: Optional[int] = None
        self._width = max(len(n.name) for n in launch.nodes) + 2

    # ---- output
    def _use_colour(self, stream: IO[str]) -> bool:
        if self.colour_mode != "auto":
            return self.colour_mode == "always"
        try:
            return stream.isatty()
        except (AttributeError, ValueError):
            return False

    def _prefix(self, child: _Child, stream: IO[str]) -> str:
        tag = f"[{child.spec.name}]".ljust(self._width)
        if child.colour and self._use_colour(stream):
            return f"\x1b[{child.colour}m{tag}\x1b[0m "
        return tag + " "

    def _pump(self, child: _Child, pipe: IO[bytes], stream: IO[str]) -> None:
        prefix = self._prefix(child, stream)
        try:
            for raw in iter(lambda: pipe.readline(65536), b""):
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                with self._out_lock:
                    try:
                        stream.write(prefix + line + "\n")
                        stream.flush()
                    except (BrokenPipeError, ValueError, OSError):
                        pass  # our own output is gone; keep draining so the child never blocks
        finally:
            pipe.close()

    # ---- lifecycle
    def _prepare(self, tmpdir: str) -> None:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # children's prints reach the prefixer line by line
        bus = self.launch.bus
        if bus.get("domain"):
            env["ROBIX_DOMAIN"] = str(bus["domain"])
        if bus.get("graph_dir"):
            env["ROBIX_GRAPH_DIR"] = str(bus["graph_dir"])
        if self.log_level:
            env["ROBIX_LOG_LEVEL"] = self.log_level
        for i, spec in enumerate(self.launch.nodes):
            config_path = None
            if spec.node is not None and (spec.params or bus):
                config_path = os.path.join(tmpdir, f"{spec.name}.yaml")
                Path(config_path).write_text(yaml.safe_dump({"params": spec.params, "bus": bus}, sort_keys=False))
            self.children.append(_Child(spec, node_argv(spec, config_path), {**env, **spec.env},
                                        _COLOURS[i % len(_COLOURS)]))

    def _start(self, child: _Child, preexec) -> None:
        child.start_at = None
        try:
            proc = subprocess.Popen(child.argv, env=child.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True, preexec_fn=preexec)
        except OSError as exc:
            log.error("cannot start %s: %s", child.spec.name, exc)
            child.last_code = 127
            self._after_exit(child, 127)
            return
        child.proc = proc
        child.pids.append(proc.pid)
        child.readers = [
            threading.Thread(target=self._pump, args=(child, proc.stdout, self.stdout), daemon=True,
                             name=f"launch-{child.spec.name}-out"),
            threading.Thread(target=self._pump, args=(child, proc.stderr, self.stderr), daemon=True,
                             name=f"launch-{child.spec.name}-err"),
        ]
        for t in child.readers:
            t.start()
        what = "restarted" if child.restarts else "started"
        log.info("%s %s (pid %d): %s", what, child.spec.name, proc.pid, " ".join(child.argv))

    def _after_exit(self, child: _Child, code: int) -> None:
        """A child ended by itself: restart it per its policy, or maybe take the graph down."""
        spec = child.spec
        wants = spec.restart == "always" or (spec.restart == "on-failure" and code != 0)
        if wants and child.restarts < spec.max_restarts:
            delay = min(spec.restart_delay_s * 2 ** child.restarts, MAX_RESTART_DELAY_S)
            child.restarts += 1
            child.start_at = time.monotonic() + delay
            log.warning("%s %s; restarting in %.1f s (restart %d of %d)", spec.name, _describe(code), delay,
                        child.restarts, spec.max_restarts)
            return
        child.finished = True
        if wants:
            log.error("%s %s; giving up after %d restart(s)", spec.name, _describe(code), child.restarts)
        else:
            (log.info if code == 0 else log.warning)("%s %s", spec.name, _describe(code))
        if spec.required and self._stop_code is None:
            self._stop_code = 0 if code == 0 else (code if 0 < code < 126 else 1)
            log.info("required node %s is down; stopping the graph", spec.name)

    def _reap(self) -> None:
        for child in self.children:
            if child.proc is not None and child.start_at is None and not child.finished:
                code = child.proc.poll()
                if code is None:
                    continue
                child.last_code = code
                _killpg(child.proc.pid, signal.SIGKILL)  # anything it left behind in its group
                child.proc = None
                self._after_exit(child, code)

    def _on_signal(self, signum, _frame) -> None:
        self._signals.append(signum)
        self._wake.set()

    def run(self) -> int:
        handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                handlers[sig] = signal.signal(sig, self._on_signal)
        tmpdir = tempfile.mkdtemp(prefix="robix-launch-")
        try:
            self._prepare(tmpdir)
            return self._supervise()
        finally:
            self._shutdown()
            shutil.rmtree(tmpdir, ignore_errors=True)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)

    def _supervise(self) -> int:
        preexec = _pdeathsig_setup()
        deadline = time.monotonic() + self.timeout_s if self.timeout_s else None
        names = ", ".join(c.spec.name for c in self.children)
        log.info("launching %d node(s): %s", len(self.children), names)
        while True:
            if self._signals:
                signum = self._signals[0]
                log.info("received %s; stopping the graph", signal.Signals(signum).name)
                return 128 + signum
            self._reap()
            if self._stop_code is not None:
                return self._stop_code
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                log.info("--timeout-s %g reached; stopping the graph", self.timeout_s)
                return TIMEOUT_EXIT_CODE
            for child in self.children:
                if child.start_at is not None and now >= child.start_at and not self._signals:
                    self._start(child, preexec)
            if self._stop_code is not None:
                return self._stop_code
            if all(c.finished for c in self.children):
                failed = [c.spec.name for c in self.children if c.last_code]
                log.info("every node has exited%s", f"; failed: {', '.join(failed)}" if failed else "")
                return 1 if failed else 0
            self._wake.wait(0.05)
            self._wake.clear()

    def _wait_all(self, children: list[_Child], timeout_s: float) -> None:
        """Wait until every child exited, the timeout passed, or another signal asks to hurry."""
        deadline = time.monotonic() + timeout_s
        signals_before = len(self._signals)
        while any(c.alive for c in children) and time.monotonic() < deadline:
            if len(self._signals) > signals_before:
                log.warning("second signal: not waiting for a clean shutdown")
                return
            self._wake.wait(0.02)
            self._wake.clear()

    def _shutdown(self) -> None:
        """SIGINT every process group, then SIGTERM, then SIGKILL; reap everything."""
        started = [c for c in self.children if c.proc is not None]
        running = [c for c in started if c.alive]
        grace = self.launch.shutdown_grace_s
        for sig, wait_s in ((signal.SIGINT, grace), (signal.SIGTERM, KILL_AFTER_TERM_S), (signal.SIGKILL, 5.0)):
            alive = [c for c in running if c.alive]
            if not alive:
                break
            if sig != signal.SIGINT:
                log.warning("%s still running after %.1f s; sending %s", ", ".join(c.spec.name for c in alive),
                            grace if sig == signal.SIGTERM else KILL_AFTER_TERM_S, sig.name)
            else:
                log.info("stopping %s", ", ".join(c.spec.name for c in alive))
            for c in alive:
                _killpg(c.proc.pid, sig)
            self._wait_all(alive, wait_s)
        for c in started:
            try:
                code = c.proc.wait(timeout=5.0)  # reaps it; after SIGKILL this returns at once
            except subprocess.TimeoutExpired:  # stuck in the kernel (uninterruptible I/O): nothing more to do
                log.error("%s (pid %d) survived SIGKILL", c.spec.name, c.proc.pid)
                continue
            _killpg(c.proc.pid, signal.SIGKILL)  # grandchildren left in its group
            c.last_code = code
            log.info("%s %s", c.spec.name, _describe(code))
        for c in started:
            for t in c.readers:
                t.join(timeout=1.0)


# --------------------------------------------------------------------------- CLI


def _main(args: argparse.Namespace) -> int:
    launch = load_launch(args.file, args.overrides)
    _check_runnable(launch, args.file)
    if args.timeout_s is not None and args.timeout_s <= 0:
        raise ConfigError(f"--timeout-s must be > 0, got {args.timeout_s}")
    if args.dry_run:
        with tempfile.TemporaryDirectory(prefix="robix-launch-") as tmp:
            launcher = Launcher(launch)
            launcher._prepare(tmp)
            for child in launcher.children:
                print(f"{child.spec.name}: {' '.join(child.argv)}")
        return 0
    return Launcher(launch, timeout_s=args.timeout_s, colour=args.color, log_level=args.log_level).run()


def register(sub) -> None:
    p = sub.add_parser("launch", help="start a graph of nodes from a launch file", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", metavar="FILE", help="launch file, e.g. launch/demo.yaml")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides of the launch file: bus.domain=lab shutdown_grace_s=2 "
                        "nodes.camera.params.rate_hz=5")
    p.add_argument("--timeout-s", type=float, default=None, help="take the graph down after this many seconds")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="colour the [name] prefixes (auto: when writing to a terminal)")
    p.add_argument("--dry-run", action="store_true", help="validate the file, print each command line, start nothing")
    p.set_defaults(func=_main)
