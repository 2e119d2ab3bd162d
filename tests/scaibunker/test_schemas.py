"""Request bodies take JSON types as they are: no bool-as-int or string-as-number coercion."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from scaigrid.modules.scaibunker.bunkers.schemas import CreateBunkerRequest, ExecRequest


@pytest.mark.parametrize(
    ("field", "value"),
    [("memory_mb", True), ("cpu_millicores", "1000"), ("disk_mb", 64.5), ("gpu_count", False)],
)
def test_create_refuses_coercible_non_integers(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        CreateBunkerRequest.model_validate({"image": "busybox", field: value})
    assert [e["loc"] for e in caught.value.errors()] == [(field,)]


@pytest.mark.parametrize(
    ("field", "value"), [("timeout_s", True), ("timeout_s", "5"), ("background", 1)]
)
def test_exec_refuses_coercible_values(field: str, value: Any) -> None:
    with pytest.raises(ValidationError):
        ExecRequest.model_validate({"command": "true", field: value})


def test_plain_json_values_are_accepted() -> None:
    request = CreateBunkerRequest.model_validate(
        {
            "image": "busybox",
            "memory_mb": 256,
            "label_set": {"a": "b"},
            "network_profile": "isolated",
        }
    )
    assert request.memory_mb == 256
    assert ExecRequest.model_validate({"command": ["ls"], "timeout_s": 5}).timeout_s == 5
