"""`robix chat`: a person's lines go out as utterances in order; what the robot does comes back on screen."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
from waiting import wait_until

from robix_planner import topics
from robix_planner.chat import ChatSession, describe, format_line
from robix_planner.messages import Command, CommandState, CommandStatus, PlannerStep, Speech, Utterance
from robix_planner.node import Node, NodeConfig

TIMEOUT_S = 10.0
QUIET = NodeConfig(heartbeat_period_s=0)
STAMP = r"\d\d:\d\d:\d\d\.\d\d\d"


# --------------------------------------------------------------------------- rendering, no sockets


def test_a_line_has_time_label_and_text_and_no_colour_unless_asked():
    t = time.mktime((2025, 1, 2, 13, 4, 5, 0, 0, -1)) + 0.25
    assert format_line("robot", "Sure.", t=t) == "13:04:05.250 robot   Sure."
    coloured = format_line("robot", "Sure.", t=t, color=True)
    assert "\x1b[" in coloured and re.sub(r"\x1b\[\d+m", "", coloured) == "13:04:05.250 robot   Sure."


def test_text_from_the_bus_cannot_drive_the_terminal():
    line = format_line("robot", "hi\x1b[2J\x1b]0;pwned\x07\rthere\nsecond line")
    assert "\x1b" not in line and "\x07" not in line and "\r" not in line
    first, second = line.split("\n")
    assert first.endswith(r"hi\x1b[2J\x1b]0;pwned\x07\x0dthere")
    assert second == " " * len("13:04:05.250 robot   ") + "second line"  # continuation under the text


def test_what_each_message_shows():
    assert describe(Speech(id="s", text="", flush=True)) == [("robot", "(interrupted)", "")]
    assert describe(Speech(id="s", text="OK.", flush=True)) == [("robot", "(interrupted) OK.", "")]
    step = PlannerStep(step=3, trigger="utterance", thought="The user wants the cup.", plan="pick up the red cup",
                       timings_ms={"total": 812.4})
    assert describe(step) == [
        ("think", "The user wants the cup.  [#3 utterance, 812 ms]", ""), ("plan", "pick up the red cup", "")]
    assert describe(step, show_thoughts=False) == [("plan", "pick up the red cup", "")]
    assert describe(PlannerStep(step=4, trigger="status", error="the model timed out"),
                    show_thoughts=False) == [("error", "the model timed out", "")]
    status = CommandStatus(command_id="c1", state=CommandState.SUCCEEDED, detail="", holding="red cup")
    assert describe(status) == [("status", "succeeded  [c1] (holding the red cup)", "")]
    status = CommandStatus(command_id="c1", state=CommandState.PREEMPTED, detail="stopped; holding the red cup",
                           holding="red cup")
    assert describe(status) == [("status", "preempted  [c1] stopped; holding the red cup", "")]
    assert describe(Utterance(text="hi", speaker="alice")) == [("user", "hi", "alice")]


# --------------------------------------------------------------------------- the session, in process


@pytest.fixture
def robot(bus_config):
    """A fake robot: one node publishing what a planner and a controller publish, and hearing utterances."""
    node = Node("fake_robot", bus_config=bus_config, node_config=QUIET).start()
    heard: queue.Queue = queue.Queue()
    node.create_subscription(topics.UTTERANCE, Utterance, heard.put)
    pubs = {topic: node.create_publisher(topic, cls) for topic, cls in (
        (topics.SPEECH, Speech), (topics.PLANNER_STEP, PlannerStep), (topics.COMMAND, Command),
        (topics.STATUS, CommandStatus), (topics.UTTERANCE, Utterance))}
    node.heard = heard
    node.pubs = pubs
    yield node
    node.shutdown()


def _connect(robot, topic_list, count: int = 1) -> None:
    for topic in topic_list:
        assert robot.pubs[topic].wait_for_subscribers(count, TIMEOUT_S), f"chat did not subscribe to {topic}"


def test_console_commands_and_escaped_slash(bus_config, robot):
    lines: list[str] = []
    with ChatSession(bus_config, emit=lines.append, connect_timeout_s=TIMEOUT_S) as chat:
        assert chat.handle_line("/help")
        assert chat.handle_line("   ")
        assert chat.handle_line("/frobnicate")
        assert chat.handle_line("//etc is a directory")
        assert not chat.handle_line("/quit")
    assert robot.heard.get(timeout=TIMEOUT_S).text == "/etc is a directory"
    assert robot.heard.empty()
    text = "\n".join(lines)
    assert "/quit" in text and "unknown command /frobnicate" in text


def test_resent_commands_and_statuses_show_once(bus_config, robot):
    lines: list[str] = []
    with ChatSession(bus_config, emit=lines.append):
        _connect(robot, (topics.COMMAND, topics.STATUS))
        cmd = Command(id="c7", text="pick up the fork", skill="pick_up", args={"object": "fork"})
        for _ in range(3):  # the command client re-sends until the first status arrives
            robot.pubs[topics.COMMAND].publish(cmd)
        for state in (CommandState.ACCEPTED, CommandState.ACCEPTED, CommandState.SUCCEEDED):
            robot.pubs[topics.STATUS].publish(CommandStatus(command_id="c7", state=state))
        wait_until(lambda: any("succeeded" in ln for ln in lines), what="the final status")
    assert sum("pick up the fork" in ln for ln in lines) == 1
    assert sum("accepted" in ln for ln in lines) == 1


def test_other_speakers_are_shown_by_name(bus_config, robot):
    lines: list[str] = []
    with ChatSession(bus_config, emit=lines.append, speaker="bob") as chat:
        _connect(robot, (topics.UTTERANCE,), count=2)  # the fake robot's own subscription and the chat's
        robot.pubs[topics.UTTERANCE].publish(Utterance(text="and the napkin too", speaker="alice"))
        wait_until(lambda: any("napkin" in ln for ln in lines), what="alice's line")
        chat.send("only the cup please")
        heard = {robot.heard.get(timeout=TIMEOUT_S).speaker: None for _ in range(2)}  # alice's and bob's
        assert sorted(heard) == ["alice", "bob"]
    assert [ln.split(None, 1)[1] for ln in lines] == ["alice   and the napkin too", "you     only the cup please"]


def test_prompt_toolkit_front_end_sends_typed_lines_and_leaves_on_ctrl_d(bus_config, robot):
    pytest.importorskip("prompt_toolkit")
    from prompt_toolkit.input import create_pipe_input
    from prompt_toolkit.output import DummyOutput

    from robix_planner.chat import run_prompt_toolkit

    with create_pipe_input() as pt_input, ChatSession(bus_config, emit=lambda _line: None,
                                                      connect_timeout_s=TIMEOUT_S) as chat:
        done = threading.Event()
        rc = []
        thread = threading.Thread(target=lambda: (rc.append(run_prompt_toolkit(chat, pt_input=pt_input,
                                                                               pt_output=DummyOutput())),
                                                  done.set()), daemon=True)
        thread.start()
        pt_input.send_text("put the cup away\r")
        assert robot.heard.get(timeout=TIMEOUT_S).text == "put the cup away"
        pt_input.send_text("actually, stop\r")
        assert robot.heard.get(timeout=TIMEOUT_S).text == "actually, stop"
        pt_input.send_text("\x04")  # Ctrl-D on an empty line
        assert done.wait(TIMEOUT_S), "Ctrl-D did not end the console"
    assert rc == [0]


# --------------------------------------------------------------------------- robix chat over a pipe


class ChatProcess:
    """`robix chat` in a subprocess, its stdin a pipe; stdout lines collected as they come."""

    def __init__(self, *args: str):
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "robix_planner.cli", "--log-level", "WARNING", "chat",
                                      *args], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in iter(self.proc.stdout.readline, ""):
            self.lines.append(line.rstrip("\n"))

    def type(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def wait_for_line(self, pattern: str) -> str:
        wait_until(lambda: any(re.search(pattern, ln) for ln in self.lines), what=f"a line matching {pattern!r}: "
                   f"{self.lines}")
        return next(ln for ln in self.lines if re.search(pattern, ln))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass


@pytest.fixture
def chat_process(bus_env):
    made: list[ChatProcess] = []

    def start(*args: str) -> ChatProcess:
        made.append(ChatProcess(*args))
        return made[-1]

    yield start
    for p in made:
        p.close()


def _graph_files_of(bus_config, pid: int) -> list:
    """The graph entries a process left behind (read raw: read_graph hides dead processes' files)."""
    from robix_planner.bus import graph_root

    return [f for f in graph_root(bus_config).glob("*.json") if json.loads(f.read_text())["pid"] == pid]


def test_chat_over_a_pipe_sends_lines_in_order_and_shows_what_the_robot_does(bus_config, robot, chat_process):
    chat = chat_process("--wait-s", "30", "--color", "never")
    _connect(robot, (topics.SPEECH, topics.PLANNER_STEP, topics.COMMAND, topics.STATUS))
    said = ["bring me the red cup", "no wait, the blue bowl", "stop"]
    for text in said:
        chat.type(text)
    heard = [robot.heard.get(timeout=TIMEOUT_S) for _ in said]
    assert [(u.text, u.speaker) for u in heard] == [(t, "user") for t in said]
    chat.wait_for_line(r"you +stop$")
    assert [ln.split(None, 2)[1:] for ln in chat.lines] == [["you", t] for t in said]

    p = robot.pubs
    p[topics.PLANNER_STEP].publish(PlannerStep(step=1, trigger="utterance", thought="The user wants the red cup.",
                                               plan="pick up the red cup", timings_ms={"total": 40.0}))
    p[topics.COMMAND].publish(Command(id="c1", text="pick up the red cup", skill="pick_up",
                                      args={"object": "red cup"}))
    p[topics.STATUS].publish(CommandStatus(command_id="c1", state=CommandState.RUNNING, detail="grasp"))
    p[topics.SPEECH].publish(Speech(id="s1", text="Sure, getting the red cup."))
    p[topics.SPEECH].publish(Speech(id="s2", text="", flush=True))
    p[topics.STATUS].publish(CommandStatus(command_id="c1", state=CommandState.PREEMPTED, holding="red cup"))
    assert re.fullmatch(STAMP + r" think   The user wants the red cup\.  \[#1 utterance, 40 ms\]",
                        chat.wait_for_line("think"))
    chat.wait_for_line(r"plan +pick up the red cup$")
    chat.wait_for_line(r"command +pick up the red cup  \[c1\]$")
    chat.wait_for_line(r"status +running  \[c1\] grasp$")
    chat.wait_for_line(r"robot +Sure, getting the red cup\.$")
    chat.wait_for_line(r"robot +\(interrupted\)$")
    chat.wait_for_line(r"status +preempted  \[c1\] \(holding the red cup\)$")
    shown = [ln.split(None, 2)[1] for ln in chat.lines]
    # Each topic arrives in order; lines of different topics may interleave as the bus delivers them.
    assert sorted(shown[3:]) == sorted(["think", "plan", "command", "status", "robot", "robot", "status"])
    assert shown.index("think") + 1 == shown.index("plan")  # one step, its thought then its plan
    assert [ln for ln in chat.lines if " status " in ln][0].split()[2] == "running"
    assert [ln for ln in chat.lines if " robot " in ln][1].endswith("(interrupted)")
    assert all(re.match(STAMP + " ", ln) for ln in chat.lines)

    # End of input: it keeps listening (--wait-s) -- a reply still arrives -- then a SIGINT ends it cleanly.
    chat.proc.stdin.close()
    p[topics.SPEECH].publish(Speech(id="s3", text="OK, I stopped."))
    chat.wait_for_line(r"robot +OK, I stopped\.$")
    chat.proc.send_signal(signal.SIGINT)
    assert chat.proc.wait(TIMEOUT_S) == 0, chat.proc.stderr.read()
    assert _graph_files_of(bus_config, chat.proc.pid) == []  # it closed its sockets, removed its graph entry


def test_chat_exits_0_at_end_of_input_and_closes_its_sockets(bus_config, robot, chat_process):
    chat = chat_process("--wait-s", "0.2", "--no-thoughts", "--color", "never", "--speaker", "carol")
    chat.type("thank you")
    chat.proc.stdin.close()
    assert chat.proc.wait(TIMEOUT_S) == 0, chat.proc.stderr.read()
    u = robot.heard.get(timeout=TIMEOUT_S)
    assert (u.text, u.speaker) == ("thank you", "carol")
    assert _graph_files_of(bus_config, chat.proc.pid) == []


def test_chat_alone_says_nobody_listens_and_still_exits_0(bus_config, chat_process):
    chat = chat_process("--connect-timeout-s", "0.2", "--color", "never")
    chat.type("hello?")
    chat.proc.stdin.close()
    assert chat.proc.wait(TIMEOUT_S) == 0, chat.proc.stderr.read()
    chat._reader.join(TIMEOUT_S)
    assert "nobody is listening on /user/utterance" in chat.lines[0]
    assert chat.lines[1].split(None, 2)[1:] == ["you", "hello?"]


# --------------------------------------------------------------------------- light imports


def test_chat_and_tts_commands_do_not_import_torch(tmp_path, bus_env):
    # Stub torch/transformers first on the path: an import of either would succeed and show.
    stubs = tmp_path / "stubs"
    for name in ("torch", "transformers"):
        (stubs / name).mkdir(parents=True)
        (stubs / name / "__init__.py").write_text("")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(stubs), os.environ.get("PYTHONPATH")])))
    code = ("import sys; from robix_planner import cli; cli.make_parser(); "
            "import robix_planner.chat, robix_planner.tts; "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
