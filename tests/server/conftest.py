"""Fixtures: one shared `pnl serve` process for the whole session (started once, killed at the end)."""

from __future__ import annotations

import httpx
import pytest
from server_testing import API_KEYS, MAX_BODY_BYTES, start_server


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The shared server: two API keys (from PNL_API_KEY), a 64 KiB body limit."""
    srv = start_server(tmp_path_factory, "main", "--max-body-bytes", str(MAX_BODY_BYTES),
                       env={"PNL_API_KEY": ",".join(API_KEYS)})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEYS[0]}"}


@pytest.fixture
def client(server, auth):
    with httpx.Client(base_url=server.url, headers=auth, timeout=60) as c:
        yield c
