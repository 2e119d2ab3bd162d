"""The blocking client's bunkers, exec and images calls against the stand-in over HTTP."""

from __future__ import annotations

import json

import httpx
import pytest

from scaigrid.client import (
    APIConnectionError,
    APITimeoutError,
    BunkerNotFound,
    BunkerNotRunning,
    BunkerStopped,
    Client,
    ConfigurationError,
    RateLimitError,
    ValidationError,
    WaitTimeout,
)
from scaigrid.client.errors import AuthTokenInvalid, AuthTokenMissing, ImageNotFound, SlugConflict
from tests.client.standin import StandinState


def test_create_sends_only_the_given_fields_and_returns_a_typed_bunker(
    client: Client, standin: StandinState
) -> None:
    bunker = client.bunkers.create(
        image="debian-12",
        name="work",
        cpu_millicores=2000,
        memory_mb=1024,
        disk_mb=4096,
        env_vars={"TOKEN": "secret"},
        label_set={"team": "data"},
        wait_s=5,
    )
    assert bunker.id.startswith("bnk_")
    assert bunker.status == "provisioning"
    assert (bunker.cpu_millicores, bunker.memory_mb, bunker.disk_mb) == (2000, 1024, 4096)
    assert bunker.env_vars == {"TOKEN": "***"}
    assert bunker.label_set == {"team": "data"}
    assert bunker.created_at is not None and bunker.created_at.tzinfo is not None
    assert bunker.raw["id"] == bunker.id
    assert standin.bunkers[bunker.id]["request"] == {
        "image": "debian-12",
        "name": "work",
        "cpu_millicores": 2000,
        "memory_mb": 1024,
        "disk_mb": 4096,
        "env_vars": {"TOKEN": "secret"},
        "label_set": {"team": "data"},
    }
    assert standin.requests[-1][2] == "wait_s=5"


def test_get_of_an_unknown_bunker_raises_bunker_not_found_with_the_request_id(
    client: Client,
) -> None:
    with pytest.raises(BunkerNotFound) as caught:
        client.bunkers.get("bnk_unknown")
    assert caught.value.status_code == 404
    assert caught.value.code == "BUNKER_NOT_FOUND"
    assert caught.value.request_id is not None and caught.value.request_id.startswith("req_")


def test_validation_errors_carry_field_details(client: Client) -> None:
    with pytest.raises(ValidationError) as caught:
        client.bunkers.create(image="debian-12", cpu_millicores=10)
    assert caught.value.details == [{"field": "cpu_millicores", "message": "must be at least 100"}]


def test_rate_limit_errors_say_when_to_retry(client: Client) -> None:
    with pytest.raises(RateLimitError) as caught:
        client.bunkers.create(image="debian-12", name="rate-limited")
    assert caught.value.retry_after == 7


def test_list_follows_next_cursor_through_every_page(client: Client, standin: StandinState) -> None:
    ids = [standin.add_bunker(name=f"b{i}")["id"] for i in range(5)]
    listed = [b.id for b in client.bunkers.list()]
    assert listed == list(reversed(ids))
    cursors = [query for method, path, query in standin.requests if path.endswith("/bunkers")]
    assert cursors == ["limit=100", "limit=100&cursor=2", "limit=100&cursor=4"]


def test_list_filters_and_stops_at_limit(client: Client, standin: StandinState) -> None:
    for i in range(4):
        standin.add_bunker(name=f"r{i}", label_set={"team": "data" if i % 2 else "web"})
    standin.add_bunker("failed", name="f", label_set={"team": "data"})
    running_data = client.bunkers.list(status=["running", "paused"], label={"team": "data"})
    assert [b.name for b in running_data] == ["r3", "r1"]
    assert [b.name for b in client.bunkers.list(limit=3)] == ["f", "r3", "r2"]
    assert standin.requests[-1][2].startswith("limit=3")
    query = next(q for _, _, q in standin.requests if "status=" in q)
    assert "status=running%2Cpaused" in query and "label=team%3Ddata" in query


def test_list_rejects_a_malformed_label_filter(client: Client) -> None:
    with pytest.raises(ValueError, match="key=value"):
        list(client.bunkers.list(label=["no-equals-sign"]))


def test_terminate_returns_the_stopping_bunker(client: Client, standin: StandinState) -> None:
    bunker_id = standin.add_bunker()["id"]
    assert client.bunkers.terminate(bunker_id).status == "stopping"


def test_wait_running_polls_until_running(client: Client, standin: StandinState) -> None:
    standin.polls_until_running = 3
    bunker = client.bunkers.create(image="debian-12")
    running = client.bunkers.wait_running(bunker.id, timeout_s=10, poll_interval_s=0.01)
    assert running.status == "running"
    assert standin.polls[bunker.id] == 3


def test_wait_running_raises_when_the_bunker_fails(client: Client) -> None:
    bunker = client.bunkers.create(image="debian-12", name="doomed")
    with pytest.raises(BunkerStopped) as caught:
        client.bunkers.wait_running(bunker.id, timeout_s=10, poll_interval_s=0.01)
    assert caught.value.bunker.status == "failed"
    assert "boot_failed" in caught.value.message


def test_wait_running_gives_up_after_its_timeout(client: Client, standin: StandinState) -> None:
    standin.polls_until_running = 1000
    bunker = client.bunkers.create(image="debian-12")
    with pytest.raises(WaitTimeout) as caught:
        client.bunkers.wait_running(bunker.id, timeout_s=0.2, poll_interval_s=0.05)
    assert caught.value.bunker.status == "pending"


def test_exec_argv_returns_bytes_and_asks_for_base64(client: Client, standin: StandinState) -> None:
    bunker_id = standin.add_bunker()["id"]
    result = client.bunkers.exec(bunker_id, ["echo", "hello", "world"], timeout_s=30, cwd="/tmp")
    assert result.ok
    assert result.stdout == b"hello world\n"
    assert result.stdout_text == "hello world\n"
    assert result.duration_ms == 5
    assert standin.execs[-1] == {
        "command": ["echo", "hello", "world"],
        "timeout_s": 30,
        "cwd": "/tmp",
        "user": "user",
        "encoding": "base64",
    }


def test_exec_is_byte_faithful(client: Client, standin: StandinState) -> None:
    bunker_id = standin.add_bunker()["id"]
    result = client.bunkers.exec(bunker_id, "binary")
    assert result.stdout == bytes(range(256))
    assert result.stderr == b"\xff\xfe-err"


def test_exec_sends_text_and_binary_stdin(client: Client, standin: StandinState) -> None:
    bunker_id = standin.add_bunker()["id"]
    assert client.bunkers.exec(bunker_id, ["cat"], stdin="text in").stdout == b"text in"
    assert standin.execs[-1]["stdin"] == "text in"
    raw = b"\x00\x01\xfe"
    assert client.bunkers.exec(bunker_id, ["cat"], stdin=raw, env={"A": "1"}).stdout == raw
    assert standin.execs[-1]["stdin_b64"] == "AAH+"
    assert standin.execs[-1]["env"] == {"A": "1"}


@pytest.mark.parametrize(
    ("command", "status", "exit_code", "shell_code"),
    [
        ("exit 3", "exited", 3, 3),
        ("timeout", "timed_out", None, 124),
        ("oom", "oom_killed", None, 137),
        ("kill", "signaled", None, 137),
        ("term", "signaled", None, 143),
        ("lost", "agent_lost", None, 255),
    ],
)
def test_exec_outcomes_are_results_not_exceptions(
    client: Client,
    standin: StandinState,
    command: str,
    status: str,
    exit_code: int | None,
    shell_code: int,
) -> None:
    bunker_id = standin.add_bunker()["id"]
    result = client.bunkers.exec(bunker_id, command)
    assert (result.status, result.exit_code, result.shell_exit_code) == (
        status,
        exit_code,
        shell_code,
    )
    assert not result.ok


def test_exec_on_a_stopped_bunker_raises_bunker_not_running(
    client: Client, standin: StandinState
) -> None:
    bunker_id = standin.add_bunker("stopping")["id"]
    with pytest.raises(BunkerNotRunning):
        client.bunkers.exec(bunker_id, "true")


def test_images_list_get_and_register(client: Client, standin: StandinState) -> None:
    source = {"kind": "debootstrap", "suite": "bookworm", "variant": "minbase"}
    registered = client.images.register("tools", source, size_mib=4096, lazy_pull=True)
    assert (registered.name, registered.status, registered.size_mib) == ("tools", "pending", 4096)
    assert registered.lazy_pull is True
    for name in ("a", "b"):
        client.images.register(name, source)
    assert [i.name for i in client.images.list()] == ["b", "a", "tools", "debian-12"]
    assert [i.name for i in client.images.list(status="ready")] == ["debian-12"]
    assert client.images.get(registered.id).name == "tools"
    with pytest.raises(SlugConflict):
        client.images.register("tools", source)
    with pytest.raises(ImageNotFound):
        client.images.get("img_unknown")


def test_a_missing_or_wrong_key_is_an_authentication_error(
    standin: StandinState, standin_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SCAIGRID_API_KEY")
    with Client(standin_url) as anonymous, pytest.raises(AuthTokenMissing):
        anonymous.bunkers.get("bnk_x")
    with Client(standin_url, "sgk_wrong") as wrong, pytest.raises(AuthTokenInvalid):
        wrong.bunkers.get("bnk_x")


def test_configuration_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCAIGRID_HOST", raising=False)
    with pytest.raises(ConfigurationError, match="SCAIGRID_HOST"):
        Client()
    with pytest.raises(ConfigurationError, match="http"):
        Client("ftp://example.com")
    with pytest.raises(ValueError, match="timeout_s"):
        Client("http://127.0.0.1", timeout_s=0)


def test_an_unreachable_host_is_a_connection_error() -> None:
    with (
        Client("http://127.0.0.1:1", "sgk_x", timeout_s=2) as unreachable,
        pytest.raises(APIConnectionError) as caught,
    ):
        unreachable.bunkers.get("bnk_x")
    assert caught.value.code == "CONNECTION_ERROR"


def test_a_server_that_does_not_answer_hits_the_deadline(standin: StandinState) -> None:
    with Client(timeout_s=0.3) as impatient, pytest.raises(APITimeoutError):
        impatient.bunkers.get("bnk_slow")


def test_every_call_has_a_deadline_and_long_calls_extend_their_read() -> None:
    seen: dict[str, dict[str, float | None]] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen[f"{request.method} {request.url.path}"] = request.extensions["timeout"]
        if request.method == "POST" and request.url.path.endswith("/exec"):
            data = {"status": "exited", "exit_code": 0, "stdout": "", "stderr": ""}
        elif request.url.path.endswith("/bunkers"):
            data = {"id": "bnk_1", "status": "pending"}
        else:
            data = {"id": "bnk_1", "status": "running"}
        return httpx.Response(200, content=json.dumps({"status": "ok", "data": data}))

    with Client("http://api.test", "sgk_x", transport=httpx.MockTransport(handler)) as mocked:
        mocked.bunkers.create(image="debian-12", wait_s=60)
        mocked.bunkers.get("bnk_1")
        mocked.bunkers.exec("bnk_1", "sleep 600", timeout_s=600)
    for timeouts in seen.values():
        assert all(value is not None for value in timeouts.values()), timeouts
    base = "/v1/modules/scaibunker/bunkers"
    assert seen[f"GET {base}/bnk_1"]["read"] == 60.0
    assert seen[f"POST {base}"]["read"] == 60 + 15.0
    read = seen[f"POST {base}/bnk_1/exec"]["read"]
    assert read is not None and read > 600


def test_the_host_may_include_the_module_path() -> None:
    for host in (
        "http://h.test:8080",
        "http://h.test:8080/",
        "http://h.test:8080/v1/modules/scaibunker/",
    ):
        with Client(host, "sgk_x") as configured:
            assert configured.base_url == "http://h.test:8080/v1/modules/scaibunker"
