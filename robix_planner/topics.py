"""The well-known topic names: the one place they are written (docs/protocol.md lists them)."""

CAMERA_HEAD = "/camera/head"
UTTERANCE = "/user/utterance"
COMMAND = "/controller/command"
STATUS = "/controller/status"
CAPABILITIES = "/controller/capabilities"
SPEECH = "/tts/speech"
PLANNER_STEP = "/planner/step"
SESSION = "/robix/session"
HEARTBEAT = "/robix/heartbeat"


def camera(name: str) -> str:
    """The topic of a named camera: ``camera("wrist_left") == "/camera/wrist_left"``."""
    return f"/camera/{name}"
