"""The README's platform walkthrough against a real controller, worker and bunker: a new
tenant's user with only scaibunker:create and scaibunker:execute creates and uses a bunker,
another tenant cannot see it, and the audit log records each step."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.e2e.conftest import create_bunker
from tests.fixtures.stack import BASE, Stack, StackError, build_busybox_tar


@pytest.fixture(scope="module")
def shared_image(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A busybox image in platform scope, so every tenant can use it."""
    tar_path: Path = build_busybox_tar(tmp_path_factory.mktemp("busybox-platform"))
    with stack.client() as admin:
        response = admin.post(
            f"{BASE}/images",
            json={
                "name": "busybox-shared",
                "scope": "platform",
                "source": {"kind": "tar", "path": str(tar_path)},
            },
        )
        if response.status_code != 201:
            raise StackError(response.text)
    stack.wait_image("busybox-shared")
    return "busybox-shared"


def _data(response: Any, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()["data"]


def _tenant_user_key(stack: Stack, name: str) -> tuple[str, str]:
    with stack.client() as admin:
        tenant = _data(admin.post("/v1/tenants", json={"name": name}), 201)
        user = _data(
            admin.post("/v1/users", json={"email": f"dev@{name}.test", "tenant_id": tenant["id"]}),
            201,
        )
        key = _data(admin.post("/v1/api-keys", json={"name": "k", "user_id": user["id"]}), 201)
    return user["id"], key["key"]


def test_walkthrough_tenant_user_grant_bunker_audit(stack: Stack, shared_image: str) -> None:
    user_id, key = _tenant_user_key(stack, "walkthrough")
    _other_id, other_key = _tenant_user_key(stack, "bystander")
    with stack.client(key) as client:
        denied = client.post(f"{BASE}/bunkers", json={"image": shared_image})
        assert denied.status_code == 403
        assert denied.json()["error"]["code"] == "AUTHZ_PERMISSION_DENIED"
    grant = {"permissions": ["scaibunker:create", "scaibunker:execute"]}
    with stack.client() as admin:
        _data(admin.put(f"/v1/users/{user_id}/module-permissions", json=grant))
        _data(
            admin.put(f"/v1/users/{_other_id}/module-permissions", json=grant)
        )  # the bystander may create bunkers too, but sees none of ours

    bunker = create_bunker(stack, shared_image, key=key)
    assert bunker["owner_user_id"] == user_id
    with stack.client(key) as client:
        result = _data(
            client.post(f"{BASE}/bunkers/{bunker['id']}/exec", json={"command": "echo hi"})
        )
        assert result["exit_code"] == 0 and result["stdout"] == "hi\n"
        files = client.get(f"{BASE}/bunkers/{bunker['id']}/files/list", params={"path": "."})
        assert files.status_code == 403  # scaibunker:files was not granted
    with stack.client(other_key) as client:
        assert client.get(f"{BASE}/bunkers/{bunker['id']}").status_code == 404
        assert (
            client.post(f"{BASE}/bunkers/{bunker['id']}/exec", json={"command": "id"}).status_code
            == 404
        )
    with stack.client(key) as client:
        _data(client.delete(f"{BASE}/bunkers/{bunker['id']}"))

    with stack.client() as admin:
        records = _data(admin.get("/v1/audit-log", params={"actor_id": user_id}))
    actions = [(r["action"], r["outcome"], r["resource_id"]) for r in reversed(records)]
    prefix = "/v1/modules/scaibunker/bunkers"
    assert actions == [
        (f"POST {prefix}", "FAILURE", None),
        (f"POST {prefix}", "SUCCESS", bunker["id"]),
        (f"POST {prefix}/{{bunker_id}}/exec", "SUCCESS", bunker["id"]),
        (f"DELETE {prefix}/{{bunker_id}}", "SUCCESS", bunker["id"]),
    ]
    assert {r["actor_type"] for r in records} == {"api_key"}
