"""The dashboard's cross-site check behind a reverse proxy (SUBSIDY_DASHBOARD_PUBLIC_ORIGIN).

A proxy that ends TLS forwards plain HTTP to the dashboard's own listener: the browser's Origin
is then https://<public host>, never the scheme and host the listener saw, so without the
setting every sign-in behind such a proxy was refused as cross-site. The requests here are
aiohttp's own test requests (no network is involved in the check)."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from server.config import Config, ConfigError
from server.processes.dashboard import same_origin

PUBLIC = "https://subsidy-dashboard.gov.example"


def post(origin: str | None, host: str = "10.0.0.5:8765", **headers: str) -> web.Request:
    if origin is not None:
        headers["Origin"] = origin
    return make_mocked_request("POST", "/login", headers={"Host": host, **headers})


def test_without_a_public_origin_only_the_listeners_own_origin_signs_in() -> None:
    assert same_origin(post("http://10.0.0.5:8765"))
    assert not same_origin(post(PUBLIC))
    assert not same_origin(post("http://evil.example"))


def test_behind_a_proxy_the_public_origin_signs_in_and_nothing_else() -> None:
    assert same_origin(post(PUBLIC), PUBLIC)
    # Referer when a browser sends no Origin: its origin part counts.
    assert same_origin(post(None, Referer=PUBLIC + "/login?error=invalid"), PUBLIC)
    for other in (
        "http://10.0.0.5:8765",  # the listener itself: only the proxy's address is the dashboard's
        "http://subsidy-dashboard.gov.example",  # the right host over the wrong scheme
        "https://subsidy-dashboard.gov.example:8443",  # another port
        "https://subsidy-dashboard.gov.example.evil.example",
        "null",
    ):
        assert not same_origin(post(other), PUBLIC), other
    assert not same_origin(post(None), PUBLIC)
    assert not same_origin(post(PUBLIC, **{"Sec-Fetch-Site": "cross-site"}), PUBLIC)


@pytest.mark.parametrize(
    "origin",
    [PUBLIC, "http://127.0.0.1:8765", "https://dash.example:1", "https://dash.example:65535", "https://[::1]:8443"],
)
def test_a_public_origin_as_browsers_send_it_is_accepted(origin: str) -> None:
    assert Config(dashboard_public_origin=origin).dashboard_public_origin == origin


@pytest.mark.parametrize(
    "origin",
    [
        PUBLIC + "/",  # a trailing slash: Origin never has one, so nothing would ever match
        PUBLIC + "/dashboard",
        "https://Subsidy-Dashboard.gov.example",  # browsers send the host in lowercase
        "ftp://dash.example",
        "dash.example",
        "https://dash.example:0",
        "https://dash.example:65536",
        "https://dash.example:123456",
        "https://dash.example\n",
        "https://-dash.example",
    ],
)
def test_a_public_origin_no_browser_would_send_is_refused_at_start(origin: str) -> None:
    with pytest.raises(ConfigError, match="SUBSIDY_DASHBOARD_PUBLIC_ORIGIN"):
        Config(dashboard_public_origin=origin)
