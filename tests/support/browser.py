"""Headless Chromium (Debian's package, driven by Playwright) with a CDP virtual authenticator, and
the passkey example's gateway (clients/python/examples/passkeys) in front of a test's server."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest
from playwright.sync_api import Browser, CDPSession, Page, sync_playwright

from tests.support.paths import REPO_ROOT
from tests.support.servers import RunningServer

EXAMPLE = REPO_ROOT / "clients" / "python" / "examples" / "passkeys"
# A platform authenticator that keeps discoverable credentials (passkeys), verifies the user (a
# fingerprint, say) and is always touched at once: WebAuthn.addVirtualAuthenticator's options.
PASSKEY_AUTHENTICATOR = {
    "protocol": "ctap2",
    "transport": "internal",
    "hasResidentKey": True,
    "hasUserVerification": True,
    "isUserVerified": True,
    "automaticPresenceSimulation": True,
}


def chromium_binary() -> str:
    """Debian's chromium (.ci/setup installs it); CHROMIUM names another. Playwright's own
    browser downloads are never used."""
    binary = os.environ.get("CHROMIUM") or shutil.which("chromium")
    assert binary, "no chromium on PATH: run .ci/setup (it installs Debian's package), or set CHROMIUM"
    return binary


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    """One headless browser for a test module; each test gets a fresh context of its own."""
    with sync_playwright() as playwright:
        # localhost is the page's host (WebAuthn's secure context without TLS, and the RP id), and
        # Chromium would try [::1] first, where another process may hold the same port number: the
        # gateway listens on 127.0.0.1 only.
        browser = playwright.chromium.launch(
            executable_path=chromium_binary(), headless=True, args=["--host-resolver-rules=MAP localhost 127.0.0.1"]
        )
        yield browser
        browser.close()


@dataclass
class PasskeyBrowser:
    """A page with a virtual passkey authenticator of its own."""

    page: Page
    cdp: CDPSession
    authenticator_id: str

    def credentials(self) -> list[dict[str, Any]]:
        """What the authenticator holds (WebAuthn.getCredentials: credentialId, isResidentCredential,
        rpId, userHandle, signCount, each base64 where binary)."""
        reply = self.cdp.send("WebAuthn.getCredentials", {"authenticatorId": self.authenticator_id})
        return list(reply["credentials"])

    def act(self, selector: str) -> tuple[str, str]:
        """Click what ``selector`` names and wait for the page's action to end: (its state, ok or
        failed, and the status line). The page marks #status busy before the click returns."""
        self.page.click(selector)
        finished = self.page.wait_for_selector("#status:not([data-state=busy])", state="attached")
        assert finished is not None
        return str(finished.get_attribute("data-state")), finished.inner_text()


@pytest.fixture
def passkey_browser(chromium: Browser) -> Iterator[PasskeyBrowser]:
    context = chromium.new_context()
    page = context.new_page()
    cdp = context.new_cdp_session(page)
    cdp.send("WebAuthn.enable")
    added = cdp.send("WebAuthn.addVirtualAuthenticator", {"options": PASSKEY_AUTHENTICATOR})
    yield PasskeyBrowser(page, cdp, added["authenticatorId"])
    context.close()


def _example_gateway() -> ModuleType:
    """The example's gateway.py, loaded from its file as a person runs it (it is no package)."""
    spec = importlib.util.spec_from_file_location("passkeys_example_gateway", EXAMPLE / "gateway.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def running_gateway(listener: socket.socket, server: RunningServer) -> Iterator[str]:
    """The example's gateway on ``listener`` (bound already, to port 0: the server's
    USERS_WEBAUTHN_ORIGINS names its port), calling ``server``; yields the page's origin."""
    example = _example_gateway()
    gateway = example.Gateway(
        listener, server.channel, issuer=server.settings.jwt_issuer, audience=server.settings.jwt_audience
    )
    thread = example.serve_in_thread(gateway)
    try:
        yield f"http://localhost:{gateway.port}"
    finally:
        gateway.shutdown()
        gateway.server_close()
        thread.join(10)
