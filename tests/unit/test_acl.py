"""The generated Mosquitto ACL (packager/acl.py), read the way Mosquitto reads it: `pattern` lines for every client
with %u (the certificate CN) and %c (the client id) substituted, `topic` lines for the `user` above them. The real
broker's verdicts are tests/integration/test_device_identity.py; this checks every role's rights on the topic names
the code builds, for many topics at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.transport.topics import Topics, matches
from packager.acl import app_feedback_topic, app_request_topic, app_response_topic, mosquitto_acl
from packager.fleet_ca import identity_name

FLEET = "f1"
T = Topics(f"edgeship/{FLEET}/")
SHA = "ab" * 32
PACKAGER, DASHBOARD, CAM = (identity_name("packager", FLEET), identity_name("dashboard", FLEET),
                            identity_name("app", FLEET, "cam"))


def allowed(acl: str, user: str, client_id: str, topic: str, access: str) -> bool:
    """Mosquitto 2.0's verdict for `access` ("read" or "write") on `topic` by `user` connected as `client_id`."""
    current: str | None = None
    for line in acl.splitlines():
        if not line or line.startswith("#"):
            continue
        kind, rest = line.split(" ", 1)
        if kind == "user":
            current = rest
            continue
        rights, filt = rest.split(" ", 1)
        if kind == "pattern":
            filt = filt.replace("%u", user).replace("%c", client_id)
        elif current != user:
            continue
        if access in rights and matches(filt, topic):  # "readwrite" holds both
            return True
    return False


ACL = mosquitto_acl(T, FLEET, ["cam"])

CASES = [
    # (user, topic, access, allowed)
    ("dev-a", T.tuf("timestamp.json"), "read", True),
    ("dev-a", T.tuf("3.root.json"), "read", True),
    ("dev-a", T.root_latest, "read", True),
    ("dev-a", T.chunk(SHA, 7), "read", True),
    ("dev-a", T.target_meta(SHA), "read", True),
    ("dev-a", T.notify, "read", True),
    ("dev-a", T.tuf("timestamp.json"), "write", False),
    ("dev-a", T.chunk(SHA, 0), "write", False),
    ("dev-a", T.notify, "write", False),
    ("dev-a", T.rollout("lab"), "write", False),
    ("dev-a", T.device("dev-a", "state"), "write", True),
    ("dev-a", T.device("dev-a", "telemetry"), "write", True),
    ("dev-a", T.device("dev-a", "events"), "write", True),
    ("dev-a", T.device("dev-a", "infer/request"), "read", True),
    ("dev-a", T.device("dev-a", "feedback"), "read", True),
    ("dev-a", app_response_topic(T, "dev-a", "cam"), "write", True),
    ("dev-a", T.device("dev-b", "state"), "write", False),
    ("dev-a", T.device("dev-b", "infer/request"), "write", False),
    ("dev-a", T.device("dev-b", "infer/response"), "read", False),
    ("dev-a", app_response_topic(T, "dev-b", "cam"), "read", False),
    ("dev-a", T.device("dev-b", "state"), "read", False),
    ("dev-a", Topics("edgeship/f2/").tuf("timestamp.json"), "read", False),
    (PACKAGER, T.tuf("timestamp.json"), "write", True),
    (PACKAGER, T.chunk(SHA, 3), "write", True),
    (PACKAGER, T.notify, "write", True),
    (PACKAGER, T.rollout("lab"), "write", True),
    (PACKAGER, T.device("dev-a", "telemetry"), "read", True),
    (PACKAGER, T.device("dev-a", "infer/request"), "write", False),
    (DASHBOARD, T.device("dev-a", "state"), "read", True),
    (DASHBOARD, T.rollout("lab"), "read", True),
    (DASHBOARD, T.device("dev-a", "state"), "write", False),
    (DASHBOARD, T.tuf("timestamp.json"), "write", False),
    # an app asks only on its own topics: the device answers those only on the app's response topic, so the app
    # cannot make it answer into another app's (agent/serve/mqtt.py)
    (CAM, app_request_topic(T, "dev-a", "cam"), "write", True),
    (CAM, app_feedback_topic(T, "dev-a", "cam"), "write", True),
    (CAM, T.device("dev-a", "infer/request"), "write", False),
    (CAM, T.device("dev-a", "feedback"), "write", False),
    (CAM, app_request_topic(T, "dev-a", "door"), "write", False),
    (CAM, app_feedback_topic(T, "dev-a", "door"), "write", False),
    ("dev-a", app_request_topic(T, "dev-a", "cam"), "read", True),
    ("dev-a", app_request_topic(T, "dev-b", "cam"), "write", False),
    (CAM, app_response_topic(T, "dev-a", "cam"), "read", True),
    (CAM, app_response_topic(T, "dev-a", "other"), "read", False),
    (CAM, T.device("dev-a", "infer/response"), "read", False),
    (CAM, T.device("dev-a", "state"), "write", False),
    (identity_name("app", FLEET, "other"), app_request_topic(T, "dev-a", "cam"), "write", False),
]


@pytest.mark.parametrize(("user", "topic", "access", "expected"), CASES)
def test_each_role_gets_exactly_its_topics(user: str, topic: str, access: str, expected: bool) -> None:
    assert allowed(ACL, user, f"client-of-{user}".replace(".", "-"), topic, access) is expected


def test_the_barrier_is_the_client_ids_own() -> None:
    assert allowed(ACL, "dev-a", "edge-agent-dev-a", T.barrier("edge-agent-dev-a"), "read")
    assert allowed(ACL, "dev-a", "edge-agent-dev-a", T.barrier("edge-agent-dev-a"), "write")
    assert not allowed(ACL, "dev-a", "edge-agent-dev-a", T.barrier("edge-agent-dev-b"), "read")
    assert not allowed(ACL, "dev-a", "edge-agent-dev-a", T.barrier("edge-agent-dev-b"), "write")


def test_the_rules_follow_the_topic_prefix_and_list_each_app_once() -> None:
    acl = mosquitto_acl(Topics("edgeship/other/"), "other", ["cam", "cam", "door"])
    rules = [line for line in acl.splitlines() if line and not line.startswith("#")]
    assert all(line.split(" ")[-1].startswith("edgeship/other/") for line in rules if line.split(" ")[0] != "user")
    assert [line for line in rules if line.startswith("user ")] == [
        "user edgeship.packager.other", "user edgeship.dashboard.other", "user edgeship.app.other.cam",
        "user edgeship.app.other.door"]


def test_the_acl_docs_security_md_shows_is_the_one_generated() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "security.md").read_text()
    shown = doc.split("For fleet `f1`:\n\n```\n", 1)[1].split("```", 1)[0]
    generated = [line for line in mosquitto_acl(Topics("edgeship/f1/"), "f1", ["cam"]).splitlines()
                 if not line.startswith("#")]
    assert shown.splitlines() == generated
