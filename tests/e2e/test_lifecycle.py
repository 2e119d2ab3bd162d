"""End to end: pause/resume, the reaper's timers and the state history on real bunkers (#4)."""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import create_bunker
from tests.fixtures.stack import BASE, DEFAULT_QUOTA_PROFILE_ID, E2E_CAPS, Stack

pytestmark = pytest.mark.e2e

COUNTER = (
    "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done "
    "</dev/null >/dev/null 2>&1 &"
)


def _exec(client: httpx.Client, bunker_id: str, command: str) -> httpx.Response:
    return client.post(f"{BASE}/bunkers/{bunker_id}/exec", json={"command": command})


def _count(client: httpx.Client, bunker_id: str) -> int:
    response = _exec(client, bunker_id, "cat /tmp/count")
    assert response.status_code == 200, response.text
    return int(response.json()["data"]["stdout"])


def _wait_status(
    client: httpx.Client, bunker_id: str, wanted: str, timeout_s: float
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        bunker = client.get(f"{BASE}/bunkers/{bunker_id}").json()["data"]
        if bunker["status"] == wanted or time.monotonic() > deadline:
            return dict(bunker)
        time.sleep(0.25)


def test_pause_freezes_every_process_and_resume_thaws(stack: Stack, busybox_image: str) -> None:
    bunker = create_bunker(stack, busybox_image, memory_mb=128, disk_mb=64)
    bid = bunker["id"]
    with stack.client() as client:
        assert _exec(client, bid, COUNTER).status_code == 200
        time.sleep(0.5)
        assert _count(client, bid) > 0

        paused = client.post(f"{BASE}/bunkers/{bid}/pause")
        assert paused.status_code == 200, paused.text
        assert paused.json()["data"]["status"] == "paused"
        again = client.post(f"{BASE}/bunkers/{bid}/pause")
        assert (again.status_code, again.json()["data"]["status"]) == (200, "paused")
        refused = _exec(client, bid, "true")
        assert refused.status_code == 409
        assert refused.json()["error"]["code"] == "BUNKER_NOT_RUNNING"
        time.sleep(1.5)

        resumed = client.post(f"{BASE}/bunkers/{bid}/resume")
        assert (resumed.status_code, resumed.json()["data"]["status"]) == (200, "running")
        before = _count(client, bid)
        time.sleep(1.0)
        after = _count(client, bid)
        assert after > before, "the counter must run again after resume"
        again = client.post(f"{BASE}/bunkers/{bid}/resume")
        assert (again.status_code, again.json()["data"]["status"]) == (200, "running")

        history = client.get(f"{BASE}/bunkers/{bid}").json()["data"]["status_history"]
        pairs = [(e["from"], e["to"], e["reason"]) for e in history]
        assert ("running", "paused", "api_pause") in pairs
        assert ("paused", "running", "api_resume") in pairs
        assert all(e["at"] for e in history)
        client.delete(f"{BASE}/bunkers/{bid}")


def test_frozen_counter_does_not_advance(stack: Stack, busybox_image: str) -> None:
    """While paused, the counter (10 increments a second when running) stays put."""
    bunker = create_bunker(stack, busybox_image, memory_mb=128, disk_mb=64)
    bid = bunker["id"]
    with stack.client() as client:
        assert _exec(client, bid, COUNTER).status_code == 200
        time.sleep(0.5)
        assert client.post(f"{BASE}/bunkers/{bid}/pause").status_code == 200
        time.sleep(2.0)
        assert client.post(f"{BASE}/bunkers/{bid}/resume").status_code == 200
        first = _count(client, bid)
        # Started at ~0.5 s of running time; 2 s frozen must not have added ~20 more.
        assert first < 15, first
        client.delete(f"{BASE}/bunkers/{bid}")


def test_pause_and_resume_refuse_terminal_bunkers(stack: Stack, busybox_image: str) -> None:
    bunker = create_bunker(stack, busybox_image, memory_mb=128, disk_mb=64)
    with stack.client() as client:
        client.delete(f"{BASE}/bunkers/{bunker['id']}")
        for action in ("pause", "resume"):
            response = client.post(f"{BASE}/bunkers/{bunker['id']}/{action}")
            assert response.status_code == 409
            assert response.json()["error"]["code"] == "BUNKER_NOT_RUNNING"
        missing = client.post(f"{BASE}/bunkers/bnk_00000000000000000000000000/pause")
        assert missing.status_code == 404


def test_idle_session_bunker_pauses_and_resumes_on_exec(stack: Stack, busybox_image: str) -> None:
    bunker = create_bunker(
        stack,
        busybox_image,
        memory_mb=128,
        disk_mb=64,
        lifecycle_mode="session",
        idle_timeout_s=2,
        session_type="api",
        session_ref="conv-1",
    )
    bid = bunker["id"]
    assert (bunker["idle_timeout_s"], bunker["max_lifetime_s"]) == (2, 86400)
    with stack.client() as client:
        paused = _wait_status(client, bid, "paused", 15)
        assert (paused["status"], paused["status_reason"]) == ("paused", "idle_timeout")
        response = _exec(client, bid, "echo back")
        assert response.status_code == 200, response.text
        assert response.json()["data"]["stdout"] == "back\n"
        now = client.get(f"{BASE}/bunkers/{bid}").json()["data"]
        assert now["status"] == "running"
        assert now["last_activity_at"] is not None
        listed = client.get(
            f"{BASE}/bunkers", params={"session_ref": "conv-1", "lifecycle": "session"}
        ).json()["data"]
        assert [b["id"] for b in listed] == [bid]
        client.delete(f"{BASE}/bunkers/{bid}")


def test_api_paused_session_bunker_stays_paused(stack: Stack, busybox_image: str) -> None:
    bunker = create_bunker(
        stack, busybox_image, memory_mb=128, disk_mb=64, lifecycle_mode="session"
    )
    with stack.client() as client:
        assert client.post(f"{BASE}/bunkers/{bunker['id']}/pause").status_code == 200
        refused = _exec(client, bunker["id"], "true")
        assert refused.json()["error"]["code"] == "BUNKER_NOT_RUNNING"
        client.delete(f"{BASE}/bunkers/{bunker['id']}")


def test_idle_ephemeral_bunker_expires(stack: Stack, busybox_image: str) -> None:
    bunker = create_bunker(stack, busybox_image, memory_mb=128, disk_mb=64, idle_timeout_s=2)
    with stack.client() as client:
        ended = _wait_status(client, bunker["id"], "expired", 15)
        assert (ended["status"], ended["status_reason"]) == ("expired", "idle_timeout")
        assert ended["ended_at"] is not None


def test_bunker_past_max_lifetime_expires(stack: Stack, busybox_image: str) -> None:
    bunker = create_bunker(stack, busybox_image, memory_mb=128, disk_mb=64, max_lifetime_s=3)
    with stack.client() as client:
        ended = _wait_status(client, bunker["id"], "expired", 15)
        assert (ended["status"], ended["status_reason"]) == ("expired", "max_lifetime")
        history = client.get(f"{BASE}/bunkers/{bunker['id']}").json()["data"]["status_history"]
        assert [(e["from"], e["to"]) for e in history][-2:] == [
            ("running", "stopping"),
            ("stopping", "expired"),
        ]


def test_timers_may_shorten_but_not_lengthen(stack: Stack, busybox_image: str) -> None:
    with stack.client() as client:
        response = client.post(
            f"{BASE}/bunkers", json={"image": busybox_image, "max_lifetime_s": 3601}
        )
        assert response.status_code == 422
        assert response.json()["error"]["code"] == "VALIDATION_ERROR"


def test_fifty_concurrent_creates_admit_exactly_five(stack: Stack, busybox_image: str) -> None:
    with stack.client() as client:
        usage = client.get(f"{BASE}/quota-profiles/usage").json()["data"][0]
        assert usage["profile_id"] == DEFAULT_QUOTA_PROFILE_ID
        live = usage["current"]["bunkers"]
        caps = {**E2E_CAPS, "max_concurrent_bunkers": live + 5}
        assert client.patch(
            f"{BASE}/quota-profiles/{DEFAULT_QUOTA_PROFILE_ID}", json=caps
        ).is_success
        try:

            def create(_: int) -> httpx.Response:
                with stack.client() as own:
                    return own.post(
                        f"{BASE}/bunkers",
                        json={
                            "image": busybox_image,
                            "cpu_millicores": 100,
                            "memory_mb": 128,
                            "disk_mb": 64,
                        },
                    )

            with concurrent.futures.ThreadPoolExecutor(50) as pool:
                responses = list(pool.map(create, range(50)))
            codes = sorted(r.status_code for r in responses)
            assert codes == [201] * 5 + [429] * 45, codes
            refused = next(r for r in responses if r.status_code == 429).json()["error"]
            assert refused["code"] == "BUNKER_QUOTA_EXCEEDED"
            (detail,) = refused["details"]
            assert detail["field"] == "max_concurrent_bunkers"
            assert (detail["cap"], detail["current"], detail["requested"]) == (
                live + 5,
                live + 5,
                1,
            )
            assert detail["profile_id"] == DEFAULT_QUOTA_PROFILE_ID
            ids = [r.json()["data"]["id"] for r in responses if r.status_code == 201]
            for bunker_id in ids:
                client.delete(f"{BASE}/bunkers/{bunker_id}")
            after = client.get(f"{BASE}/quota-profiles/usage").json()["data"][0]["current"]
            assert after["bunkers"] == live
        finally:
            client.patch(f"{BASE}/quota-profiles/{DEFAULT_QUOTA_PROFILE_ID}", json=E2E_CAPS)


def _paused_at(client: httpx.Client, bunker_id: str) -> list[str]:
    history = client.get(f"{BASE}/bunkers/{bunker_id}").json()["data"]["status_history"]
    return [e["at"] for e in history if e["to"] == "paused"]


def test_running_execs_keep_a_session_bunker_from_idling(stack: Stack, busybox_image: str) -> None:
    """SPEC §2.6: the idle timer runs only while no exec runs, foreground or background."""
    bunker = create_bunker(
        stack, busybox_image, memory_mb=128, disk_mb=64, lifecycle_mode="session", idle_timeout_s=2
    )
    bid = bunker["id"]
    with stack.client() as client:
        foreground = client.post(
            f"{BASE}/bunkers/{bid}/exec", json={"command": "sleep 7", "timeout_s": 30}
        )
        assert foreground.status_code == 200, foreground.text
        assert foreground.json()["data"]["exit_code"] == 0
        assert _paused_at(client, bid) == [], "paused while a foreground exec ran"

        background = client.post(
            f"{BASE}/bunkers/{bid}/exec",
            json={"command": "sleep 7", "background": True},
        )
        assert background.status_code in (200, 201, 202), background.text
        started = time.monotonic()
        while time.monotonic() < started + 6:
            assert client.get(f"{BASE}/bunkers/{bid}").json()["data"]["status"] == "running"
            time.sleep(0.5)
        paused = _wait_status(client, bid, "paused", 20)
        assert (paused["status"], paused["status_reason"]) == ("paused", "idle_timeout")
        # Not before the background exec ended (7 s) plus the 2 s idle timeout.
        assert time.monotonic() - started >= 8.5
        client.delete(f"{BASE}/bunkers/{bid}")
