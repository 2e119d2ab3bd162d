"""Directory listings are paged and can never overflow the worker channel."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import create_bunker
from tests.fixtures.stack import BASE, Stack

pytestmark = pytest.mark.e2e


def test_listing_pages_with_limit_and_cursor(stack: Stack, busybox_image: str) -> None:
    bunker = create_bunker(stack, busybox_image)
    with stack.client() as client:
        made = client.post(
            f"{BASE}/bunkers/{bunker['id']}/exec",
            json={"command": "mkdir many && cd many && seq 1 1500 | xargs touch && echo ok"},
        ).json()["data"]
        assert made["stdout"] == "ok\n", made
        names: list[str] = []
        cursor = None
        pages = 0
        while True:
            params = {"path": "many", "limit": 1000, **({"cursor": cursor} if cursor else {})}
            body = client.get(f"{BASE}/bunkers/{bunker['id']}/files/list", params=params).json()
            names += [entry["name"] for entry in body["data"]]
            pages += 1
            cursor = body["next_cursor"]
            assert body["has_more"] == (cursor is not None)
            if cursor is None:
                break
        assert pages == 2 and sorted(names, key=int) == [str(i) for i in range(1, 1501)]
        client.delete(f"{BASE}/bunkers/{bunker['id']}")


def test_a_huge_listing_answers_for_itself_and_keeps_the_worker(
    stack: Stack, busybox_image: str
) -> None:
    bunker = create_bunker(stack, busybox_image)
    with stack.client() as client:
        workers_before = client.get(f"{BASE}/workers").json()["data"]
        response = client.get(
            f"{BASE}/bunkers/{bunker['id']}/files/list",
            params={"path": "/", "depth": 10, "limit": 1000},
        )
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) == 1000
        past = client.get(
            f"{BASE}/bunkers/{bunker['id']}/files/list",
            params={"path": "/", "depth": 10, "cursor": "9990", "limit": 100},
        )
        assert past.status_code == 422
        assert [d["field"] for d in past.json()["error"]["details"]] == ["query.cursor"]
        after = client.post(f"{BASE}/bunkers/{bunker['id']}/exec", json={"command": "echo up"})
        assert after.json()["data"]["stdout"] == "up\n"
        workers_after = client.get(f"{BASE}/workers").json()["data"]
        assert [w["registered_at"] for w in workers_after] == [
            w["registered_at"] for w in workers_before
        ]
        assert all(w["connection"] == "online" for w in workers_after)
        client.delete(f"{BASE}/bunkers/{bunker['id']}")


def test_range_reads_ignore_headers_they_cannot_parse(stack: Stack, busybox_image: str) -> None:
    """RFC 9110 §14.2: a malformed or multi-part ``Range`` is ignored (200, whole file); a
    satisfiable one gets 206; one starting past the end gets 416."""
    bunker = create_bunker(stack, busybox_image)
    url = f"{BASE}/bunkers/{bunker['id']}/files"
    with stack.client() as client:
        body = bytes(range(256)) * 4
        put = client.put(url, params={"path": "r.bin"}, content=body)
        assert put.status_code == 200, put.text
        for header in ("bytes=abc", "bytes=5-1", "items=0-3", "bytes=0-1,4-5", "bytes=-"):
            whole = client.get(url, params={"path": "r.bin"}, headers={"Range": header})
            assert (whole.status_code, whole.content) == (200, body), header
        part = client.get(url, params={"path": "r.bin"}, headers={"Range": "bytes=-4"})
        assert (part.status_code, part.content) == (206, body[-4:])
        past = client.get(url, params={"path": "r.bin"}, headers={"Range": "bytes=5000-"})
        assert past.status_code == 416
        assert past.json()["error"]["code"] == "VALIDATION_ERROR"
        client.delete(f"{BASE}/bunkers/{bunker['id']}")
