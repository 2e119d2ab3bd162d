"""Client test fixtures: the stand-in API on a loopback port (see ``standin.py``) and clients
configured for it through the environment, as a user would."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from scaigrid.client import AsyncClient, Client
from tests.client.standin import API_KEY, StandinApp, StandinState, serve


@pytest.fixture(scope="session")
def standin_app() -> StandinApp:
    """One stand-in app per session; its state is reset for every test."""
    return StandinApp()


@pytest.fixture(scope="session")
def standin_url(standin_app: StandinApp) -> Iterator[str]:
    """URL of the stand-in served over HTTP on 127.0.0.1."""
    with serve(standin_app) as url:
        yield url


@pytest.fixture
def standin(
    standin_app: StandinApp, standin_url: str, monkeypatch: pytest.MonkeyPatch
) -> StandinState:
    """The stand-in's fresh state, with SCAIGRID_HOST / SCAIGRID_API_KEY pointing at it."""
    state = standin_app.reset()
    monkeypatch.setenv("SCAIGRID_HOST", standin_url)
    monkeypatch.setenv("SCAIGRID_API_KEY", API_KEY)
    return state


@pytest.fixture
def client(standin: StandinState) -> Iterator[Client]:
    """A blocking client configured from the environment."""
    with Client(timeout_s=10) as sync_client:
        yield sync_client


@pytest.fixture
async def aclient(standin: StandinState) -> AsyncIterator[AsyncClient]:
    """An async client configured from the environment."""
    async with AsyncClient(timeout_s=10) as async_client:
        yield async_client
