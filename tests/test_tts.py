"""The TTS node speaks the robot's replies in order and stops mid-sentence on a flush (barge-in)."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest
from waiting import wait_until

from robix_planner import topics
from robix_planner.config import ConfigError
from robix_planner.messages import Speech
from robix_planner.node import Node, NodeConfig, new_id
from robix_planner.tts import EspeakSpeaker, FakeSpeaker, PrintSpeaker, SpeechQueue, TTSNode

TIMEOUT_S = 5.0
#: How soon after a flush is published the speech must have stopped (bus hop + executor + stop).
STOP_BOUND_S = 1.0


QUIET = NodeConfig(heartbeat_period_s=0)


@pytest.fixture
def graph(bus_config):
    """A TTS node with the given speaker and a publisher of /tts/speech connected to it."""
    made: list[Node] = []

    def make(speaker=None, **params):
        tts = TTSNode(TTSNode.Params(**params), speaker=speaker, bus_config=bus_config, node_config=QUIET).start()
        made.append(tts)
        planner = Node("fake_planner", bus_config=bus_config, node_config=QUIET).start()
        made.append(planner)
        pub = planner.create_publisher(topics.SPEECH, Speech)
        assert pub.wait_for_subscribers(1, TIMEOUT_S), "the TTS node did not subscribe to /tts/speech"
        return tts, pub

    yield make
    for node in reversed(made):
        node.shutdown()


def say(text: str, flush: bool = False) -> Speech:
    return Speech(id=new_id(), text=text, flush=flush)


# --------------------------------------------------------------------------- the queue, no sockets


def test_queue_speaks_texts_in_order():
    speaker = FakeSpeaker()
    q = SpeechQueue(speaker)
    try:
        for text in ("one.", "two.", "three."):
            assert q.put(text)
        assert speaker.wait_for(lambda calls: speaker.texts("said") == ["one.", "two.", "three."]), speaker.calls
        assert speaker.texts("stop") == []
    finally:
        q.close()


def test_put_and_flush_never_wait_for_speech():
    speaker = FakeSpeaker(duration_s=30)
    q = SpeechQueue(speaker)
    try:
        t0 = time.perf_counter()
        q.put("a long sentence")
        q.put("another")
        assert speaker.wait_for(lambda calls: ("say", "a long sentence") in calls)
        q.put("a third")
        q.flush()
        assert time.perf_counter() - t0 < 2.0
        assert speaker.wait_for(lambda calls: ("stopped", "a long sentence") in calls)
    finally:
        q.close()


def test_a_stop_that_comes_before_say_starts_still_stops_it():
    # The queue hands a text over and a flush arrives before the speaker has begun: the stop holds
    # until reset(), which the queue calls before the next text only.
    speaker = FakeSpeaker(duration_s=30)
    speaker.stop()
    t0 = time.perf_counter()
    speaker.say("flushed before it began")
    assert time.perf_counter() - t0 < 1.0
    assert speaker.calls == [("stop", None), ("stopped", "flushed before it began")]
    speaker.reset()
    speaker.duration_s = 0
    speaker.say("next")
    assert speaker.texts("said") == ["next"]


def test_queue_is_bounded():
    speaker = FakeSpeaker(duration_s=30)
    q = SpeechQueue(speaker, max_queue=2)
    try:
        q.put("speaking")
        assert speaker.wait_for(lambda calls: ("say", "speaking") in calls)
        assert q.put("a") and q.put("b")
        assert not q.put("c")
        assert q.dropped == 1
    finally:
        q.close()


# --------------------------------------------------------------------------- the node on the bus


def test_node_speaks_queued_texts_in_order(graph):
    speaker = FakeSpeaker(duration_s=0.05)  # slow enough that the texts queue up
    tts, pub = graph(speaker)
    texts = ["Sure, I will clear the table.", "First the red cup.", "Then the fork.", "Done!"]
    for text in texts:
        pub.publish(say(text))
    assert speaker.wait_for(lambda calls: speaker.texts("said") == texts), speaker.calls
    assert speaker.texts("say") == texts
    assert speaker.texts("stop") == []


def test_flush_stops_the_current_text_at_once_and_drops_the_queue(graph):
    speaker = FakeSpeaker(duration_s=30)  # each text "takes" 30 s unless stopped
    tts, pub = graph(speaker)
    first = "I am putting the red cup into the bus tub, and then"
    pub.publish(say(first))
    pub.publish(say("I will wipe the table."))
    pub.publish(say("Anything else?"))
    assert speaker.wait_for(lambda calls: speaker.texts("say") == [first])
    t0 = time.monotonic()
    pub.publish(say("", flush=True))
    assert speaker.wait_for(lambda calls: ("stopped", first) in calls,
                            timeout_s=STOP_BOUND_S), f"not stopped within {STOP_BOUND_S} s: {speaker.calls}"
    stopped_after_s = time.monotonic() - t0
    assert ("stop", None) in speaker.calls
    # The queue was dropped: what comes next is said, the two dropped texts never are.
    speaker.duration_s = 0
    pub.publish(say("OK, stopping."))
    assert speaker.wait_for(lambda calls: "OK, stopping." in speaker.texts("said")), speaker.calls
    assert speaker.texts("say") == [first, "OK, stopping."]
    assert stopped_after_s < STOP_BOUND_S


def test_a_flush_with_text_interrupts_then_says_it(graph):
    speaker = FakeSpeaker(duration_s=30)
    tts, pub = graph(speaker)
    pub.publish(say("A long explanation of what I am doing."))
    assert speaker.wait_for(lambda calls: len(speaker.texts("say")) == 1)
    speaker.duration_s = 0
    pub.publish(say("Stopping now.", flush=True))
    assert speaker.wait_for(lambda calls: speaker.texts("said") == ["Stopping now."]), speaker.calls
    assert speaker.texts("stopped") == ["A long explanation of what I am doing."]


def test_a_flush_while_silent_does_not_cut_the_next_text(graph):
    speaker = FakeSpeaker()
    tts, pub = graph(speaker)
    pub.publish(say("", flush=True))
    pub.publish(say("Hello."))
    assert speaker.wait_for(lambda calls: speaker.texts("said") == ["Hello."]), speaker.calls


# --------------------------------------------------------------------------- espeak-ng, faked on PATH


def _install_fake_espeak(tmp_path, monkeypatch, *, ignore_sigterm: bool = False):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "espeak.log"
    script = bindir / "espeak-ng"
    script.write_text(
        "#!/bin/sh\n"
        + ("trap '' TERM\n" if ignore_sigterm else "")  # ignored signals stay ignored across exec
        + f"LOG='{log}'\n"
        'echo "pid $$" >> "$LOG"\n'
        'echo "args $*" >> "$LOG"\n'
        'printf "text " >> "$LOG"; cat >> "$LOG"\n'
        'echo "ready" >> "$LOG"\n'
        "exec sleep 30\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    return log


@pytest.fixture
def fake_espeak(tmp_path, monkeypatch):
    """An executable named espeak-ng first on PATH: it logs its pid, its arguments and its stdin, then
    "speaks" for 30 s (sleeps), so only a terminate ends it early."""
    return _install_fake_espeak(tmp_path, monkeypatch)


def _espeak_runs(log) -> list[dict]:
    runs: list[dict] = []
    if not log.exists():
        return runs
    for line in log.read_text().splitlines():
        key, _, value = line.partition(" ")
        if key == "pid":
            runs.append({"pid": int(value)})
        elif runs:
            runs[-1][key] = value
    return runs


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (terminated, not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_espeak_engine_runs_espeak_ng_with_the_text_on_stdin_and_flush_terminates_it(graph, fake_espeak):
    tts, pub = graph(engine="auto", voice="en-us", rate_wpm=160)
    assert isinstance(tts.speaker, EspeakSpeaker)
    text = "I'll put the red cup into the bus tub; $(touch /tmp/never) `and` -v de"
    pub.publish(say(text))
    pub.publish(say("This one waits in the queue."))
    wait_until(lambda: any("ready" in r for r in _espeak_runs(fake_espeak)), what="espeak-ng to read its text")
    first = _espeak_runs(fake_espeak)[0]
    assert first["text"] == text  # verbatim on stdin: no shell, nothing taken as an option
    assert first["args"] == "--stdin -v en-us -s 160 -a 100"
    assert _alive(first["pid"])  # still "speaking"
    t0 = time.monotonic()
    pub.publish(say("", flush=True))
    wait_until(lambda: not _alive(first["pid"]), timeout_s=STOP_BOUND_S + TERMINATE_MARGIN_S,
               what="the flush to terminate espeak-ng")
    stopped_after_s = time.monotonic() - t0
    pub.publish(say("After the flush."))
    wait_until(lambda: len(_espeak_runs(fake_espeak)) >= 2 and "ready" in _espeak_runs(fake_espeak)[1],
               what="the next text to be spoken")
    runs = _espeak_runs(fake_espeak)
    assert [r.get("text") for r in runs] == [text, "After the flush."]  # the queued one was dropped
    assert stopped_after_s < STOP_BOUND_S + TERMINATE_MARGIN_S
    tts.shutdown()  # shutting down stops the second one too
    wait_until(lambda: not _alive(runs[1]["pid"]), timeout_s=STOP_BOUND_S + TERMINATE_MARGIN_S,
               what="shutdown to terminate espeak-ng")


#: espeak-ng gets SIGTERM at once; this margin covers the process exiting and being reaped.
TERMINATE_MARGIN_S = 0.5


def test_an_espeak_ng_that_ignores_sigterm_is_killed_and_a_flush_never_waits_for_it(tmp_path, monkeypatch):
    from robix_planner.tts import TERMINATE_GRACE_S

    log = _install_fake_espeak(tmp_path, monkeypatch, ignore_sigterm=True)
    q = SpeechQueue(EspeakSpeaker())
    try:
        q.put("You will have to kill me.")
        wait_until(lambda: any("ready" in r for r in _espeak_runs(log)), what="espeak-ng to start")
        pid = _espeak_runs(log)[0]["pid"]
        t0 = time.perf_counter()
        q.flush()  # what the node's executor calls: it must not wait for the process
        assert time.perf_counter() - t0 < 0.1
        wait_until(lambda: not _alive(pid), timeout_s=TERMINATE_GRACE_S + 2.0, what="espeak-ng to be killed")
        assert time.perf_counter() - t0 >= TERMINATE_GRACE_S * 0.9  # it did ignore SIGTERM
        wait_until(lambda: q.idle, what="the speech thread to be free again")
    finally:
        q.close()


def test_engine_espeak_without_espeak_ng_says_what_to_do(tmp_path, monkeypatch, bus_config):
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    with pytest.raises(ConfigError, match="apt-get install espeak-ng.*engine=print"):
        TTSNode(TTSNode.Params(engine="espeak"), bus_config=bus_config, node_config=QUIET)
    assert not list((tmp_path / "graph" / "test").glob("*.json"))  # failed before joining the bus


def test_engine_auto_without_espeak_ng_prints(tmp_path, monkeypatch, bus_config):
    monkeypatch.setenv("PATH", str(tmp_path))
    tts = TTSNode(TTSNode.Params(engine="auto"), bus_config=bus_config, node_config=QUIET)
    try:
        assert isinstance(tts.speaker, PrintSpeaker)
    finally:
        tts.shutdown()


def test_bad_params_are_refused(bus_config):
    with pytest.raises(ConfigError, match="rate_wpm"):
        TTSNode(TTSNode.Params(rate_wpm=5), speaker=FakeSpeaker(), bus_config=bus_config)


# --------------------------------------------------------------------------- robix tts


def test_robix_tts_prints_replies_and_stops_on_sigint(bus_env, bus_config):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "robix_planner.cli", "--log-level", "WARNING", "tts",
                             "--engine", "print"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        with Node("fake_planner", bus_config=bus_config, node_config=QUIET) as planner:
            pub = planner.create_publisher(topics.SPEECH, Speech)
            assert pub.wait_for_subscribers(1, 15.0), "robix tts did not subscribe"
            pub.publish(say("Hello, I am the robot."))
            pub.publish(say("Shall I clear the table?"))
            wait_until(lambda: len(lines) >= 2, what="robix tts to print both replies")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(TIMEOUT_S) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert lines == ["robot: Hello, I am the robot.\n", "robot: Shall I clear the table?\n"]
