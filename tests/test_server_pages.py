"""The server's pages in headless Chromium: the overview, one click to the incident report; hostile names escaped;
behind the HTTP guard when tokens are on."""

from __future__ import annotations

import dataclasses
import html
import json
import pathlib
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import gradwatch  # noqa: E402
from browser_support import Browser  # noqa: E402
from gradwatch.server.app import ServerApp  # noqa: E402
from gradwatch.server.config import AuthConfig, ServerConfig  # noqa: E402
from gradwatch.server.http_api import CSP  # noqa: E402
from server_support import http_get  # noqa: E402
from wait_support import wait_until  # noqa: E402

WAIT_S = 30.0
#: Names that would run script, inject markup or break out of an attribute if a page did not escape them.
HOSTILE_RUN = "<script>window.pwned=1</script>\"'&run"
HOSTILE_LAYER = '<img src=x onerror="window[\x27pwned\x27]=2">'
HOSTILE_JOB = "</td><b id=injected>job"

PLOTS_JS = """JSON.stringify([...document.querySelectorAll('svg.plot')].map(e => {
  const r = e.getBoundingClientRect();
  return {section: e.closest('section').id, w: r.width, h: r.height, marks: e.querySelectorAll('path,rect').length};
}))"""
#: What injected markup or script would leave behind in the page.
INJECTED_JS = """JSON.stringify({pwned: window.pwned || 0, scripts: document.scripts.length,
  imgs: document.images.length, injected: !!document.getElementById('injected')})"""


def nan_run(server: str, **options: Any) -> None:
    """A small model with a hostile layer name whose input turns NaN at step 30 (a critical incident)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module(HOSTILE_LAYER, torch.nn.Linear(8, 16))
    model.add_module("act", torch.nn.ReLU())
    model.add_module("head", torch.nn.Linear(16, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    with gradwatch.attach(model, optimizer, run=HOSTILE_RUN, job_name=HOSTILE_JOB, server=server,
                          overhead_budget=0, **options) as monitor:  # fmt: skip
        for step in range(1, 61):
            x = torch.randn(32, 8)
            if step == 30:
                x[0, 0] = float("nan")
            loss = torch.nn.functional.mse_loss(model(x), x[:, :1])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.step(loss)
        assert monitor.close(timeout=10)


@pytest.fixture(scope="module")
def app() -> Iterator[ServerApp]:
    app = ServerApp(ServerConfig.local()).start()
    nan_run(app.grpc_target)
    wait_until(lambda: [i for i in _incidents(app) if i["status"] == "complete"], WAIT_S,
               what="a complete incident", interval=0.05, detail=lambda: repr(_incidents(app)))  # fmt: skip
    yield app
    app.stop()


def _incidents(app: ServerApp) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"{app.http_url}/api/v1/incidents", timeout=WAIT_S) as response:
        return list(json.loads(response.read())["incidents"])


def test_pages_overview_to_incident_in_chromium_escaped_and_drawn(app: ServerApp) -> None:
    status, content_type, body = http_get(app.http_url + "/")
    assert status == 200 and content_type == "text/html; charset=utf-8"
    assert HOSTILE_RUN.encode() not in body and HOSTILE_LAYER.encode() not in body  # only escaped forms
    with Browser() as browser:
        page = browser.new_page()
        page.open(app.http_url + "/")
        assert page.errors == []
        assert json.loads(page.evaluate(INJECTED_JS)) == {"pwned": 0, "scripts": 0, "imgs": 0, "injected": False}
        text = page.evaluate("document.body.innerText")
        assert HOSTILE_RUN in text and HOSTILE_JOB in text  # shown as text, exactly
        assert "NaN (last finite" in text  # the run's loss is NaN since step 30
        sections = page.evaluate("[...document.querySelectorAll('section')].map(s => s.id).join(',')")
        assert sections == "firing,runs,incidents"
        # The firing non_finite alert links to its incident: follow that link, as a person would.
        link = page.evaluate("[...document.querySelectorAll('#firing a')].find(a => a.textContent === 'incident').href")
        (incident,) = [i for i in _incidents(app) if i["detector"] == "non_finite"]
        assert link == f"{app.http_url}/incidents/{incident['id']}"
        page.open(link)
        assert page.errors == []
        assert json.loads(page.evaluate(INJECTED_JS)) == {"pwned": 0, "scripts": 0, "imgs": 0, "injected": False}
        assert HOSTILE_LAYER in page.evaluate("document.body.innerText")
        plots = json.loads(page.evaluate(PLOTS_JS))
        back = page.evaluate("document.querySelector('a').href")
    assert [p["section"] for p in plots][:3] == ["loss", "grad-norm", "heatmap"], plots
    assert all(p["w"] > 100 and p["h"] > 50 and p["marks"] > 3 for p in plots), plots
    assert back == app.http_url + "/"
    status, content_type, body = http_get(f"{app.http_url}/incidents/{incident['id']}")
    assert status == 200 and b"<script" not in body


def test_pages_headers_latest_link_and_unknown_incident(app: ServerApp) -> None:
    (incident,) = [i for i in _incidents(app) if i["detector"] == "non_finite"]
    with urllib.request.urlopen(app.http_url + "/", timeout=WAIT_S) as response:
        assert response.headers["Content-Security-Policy"] == CSP
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    query = urllib.parse.urlencode({"run": HOSTILE_RUN, "detector": "non_finite"})
    status, _, latest = http_get(f"{app.http_url}/incidents/latest?{query}")
    assert status == 200 and incident["id"].encode() in latest
    status, content_type, body = http_get(app.http_url + "/incidents/ffffffffffff")
    assert status == 404 and content_type.startswith("text/html") and b'href="../"' in body


def test_pages_are_behind_the_guard_when_tokens_are_on(tmp_path: pathlib.Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text('tokens: [{name: oncall, token: "oncall-secret-0123456789", api: true}]\n')
    config = dataclasses.replace(ServerConfig.local(), auth=AuthConfig(tokens_file=str(tokens)))
    app = ServerApp(config).start()
    try:
        for path in ("/", "/incidents/ffffffffffff"):
            assert http_get(app.http_url + path)[0] == 401
            request = urllib.request.Request(
                app.http_url + path, headers={"Authorization": "Bearer oncall-secret-0123456789"}
            )
            try:
                status = urllib.request.urlopen(request, timeout=WAIT_S).status
            except urllib.error.HTTPError as exc:
                status = exc.code
            assert status == (200 if path == "/" else 404)
    finally:
        app.stop()


ONCALL = "oncall-secret-0123456789"
AGENT = "agent-secret-0123456789ab"
#: Selector of the document's state: where it is, whether it shows the login form, its heading.
WHERE_JS = """JSON.stringify({path: location.pathname + location.search, form: !!document.querySelector(
  'form[action=login]'), h1: (document.querySelector('h1') || {}).textContent || ''})"""


def _submit(page: Any, token: str) -> None:
    page.evaluate(f"document.querySelector('input[name=token]').value = {json.dumps(token)}; "
                  "document.querySelector('form').submit(); true")  # fmt: skip


#: The page a protected path answers without a session (server/sessions.py): same address, no form, and an
#: immediate refresh on to the login. Never the page a test waits for.
FORWARDING_JS = "!!document.querySelector('meta[http-equiv=refresh][content^=\"0;\"]')"


def _at(page: Any, path: str, form: bool) -> dict[str, Any]:
    """Wait until the page is `path` (with the login form or not), past the forwarding page at that address."""
    want = json.dumps(path)
    return json.loads(page.wait_for(
        f"location.pathname + location.search === {want} && document.readyState === 'complete' && "
        f"!!document.querySelector('form[action=login]') === {json.dumps(form)} && !{FORWARDING_JS} && "
        f"({WHERE_JS})"))  # fmt: skip


def test_pages_login_from_a_link_on_another_site_in_chromium(tmp_path: pathlib.Path) -> None:
    """With tokens on, an incident link clicked on another site (Alertmanager, Grafana) leads to a login form; a
    wrong token is refused; the right one lands on the report, and later clicks go straight through (the
    SameSite=Strict cookie travels on the server's own follow-up navigation). Hostile names stay escaped."""
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f'tokens: [{{name: oncall, token: "{ONCALL}", api: true}}, '
                      f'{{name: agent, token: "{AGENT}", jobs: ["*"]}}]\n')  # fmt: skip
    config = dataclasses.replace(ServerConfig.local(), auth=AuthConfig(tokens_file=str(tokens)))
    app = ServerApp(config).start()
    try:
        nan_run(app.grpc_target, token=AGENT)
        bearer = {"Authorization": f"Bearer {ONCALL}"}

        def complete() -> list[dict[str, Any]]:
            request = urllib.request.Request(f"{app.http_url}/api/v1/incidents?detector=non_finite", headers=bearer)
            with urllib.request.urlopen(request, timeout=WAIT_S) as response:
                return [i for i in json.loads(response.read())["incidents"] if i["status"] == "complete"]

        wait_until(complete, WAIT_S, what="a complete non_finite incident", interval=0.05)
        (incident,) = complete()
        link = f"{app.http_url}/incidents/{incident['id']}"
        overview = f"{app.http_url}/?{urllib.parse.urlencode({'run': HOSTILE_RUN})}"
        elsewhere = "data:text/html," + urllib.parse.quote(
            f'<a id="incident" href="{html.escape(link)}">incident</a> '
            f'<a id="overview" href="{html.escape(overview)}">run</a>'
        )
        with Browser() as browser:
            page = browser.new_page()
            page.open(elsewhere)
            page.evaluate("document.getElementById('incident').click(); true")
            _at(page, "/login?next=" + urllib.parse.quote(f"incidents/{incident['id']}", safe=""), form=True)
            _submit(page, "not-the-token-0123456789")
            refused = _at(page, "/login", form=True)
            assert "not accepted" in page.evaluate("document.body.innerText"), refused
            assert not [c for c in page.cookies() if c["name"] == "gradwatch_session"]
            _submit(page, ONCALL)
            _at(page, f"/incidents/{incident['id']}", form=False)
            page.errors.clear()  # the 401 answers on the way are expected; the report itself must be clean
            assert json.loads(page.evaluate(INJECTED_JS)) == {"pwned": 0, "scripts": 0, "imgs": 0, "injected": False}
            assert HOSTILE_LAYER in page.evaluate("document.body.innerText")
            plots = json.loads(page.evaluate(PLOTS_JS))
            assert [p["section"] for p in plots][:3] == ["loss", "grad-norm", "heatmap"], plots
            (cookie,) = [c for c in page.cookies() if c["name"] == "gradwatch_session"]
            assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
            assert not cookie["secure"]  # plain HTTP here; Secure and the __Host- prefix come with TLS
            # Signed in: a click from the other site reaches the page without the form, hostile run name included.
            page.open(elsewhere)
            page.evaluate("document.getElementById('overview').click(); true")
            _at(page, "/?" + urllib.parse.urlencode({"run": HOSTILE_RUN}), form=False)
            assert json.loads(page.evaluate(INJECTED_JS)) == {"pwned": 0, "scripts": 0, "imgs": 0, "injected": False}
            assert HOSTILE_RUN in page.evaluate("document.body.innerText")
            # Logging out is a POST with its CSRF pair; afterwards the link leads to the form again.
            page.open(f"{app.http_url}/logout")
            page.evaluate("document.querySelector('form').submit(); true")
            _at(page, "/login", form=True)
            page.open(link)
            _at(page, "/login?next=" + urllib.parse.quote(f"incidents/{incident['id']}", safe=""), form=True)
    finally:
        app.stop()


def test_pages_login_refuses_forged_posts_open_redirects_and_never_opens_the_api(tmp_path: pathlib.Path) -> None:
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f'tokens: [{{name: oncall, token: "{ONCALL}", api: true}}, '
                      f'{{name: agent, token: "{AGENT}", jobs: ["*"]}}]\n')  # fmt: skip
    config = dataclasses.replace(ServerConfig.local(), auth=AuthConfig(tokens_file=str(tokens)))
    app = ServerApp(config).start()
    opener = urllib.request.build_opener(_NoRedirect)
    try:

        def post(path: str, form: dict[str, str], cookie: str = "") -> tuple[int, Any]:
            request = urllib.request.Request(app.http_url + path, data=urllib.parse.urlencode(form).encode(),
                                             headers={"Cookie": cookie} if cookie else {}, method="POST")  # fmt: skip
            try:
                with opener.open(request, timeout=WAIT_S) as response:
                    return response.status, response.headers
            except urllib.error.HTTPError as exc:
                return exc.code, exc.headers

        # A post from another site has no CSRF cookie (SameSite=Strict): refused, whatever the token.
        assert post("/login", {"token": ONCALL, "csrf": "guessed"})[0] == 403
        with opener.open(app.http_url + "/login", timeout=WAIT_S) as response:
            csrf_cookie = response.headers["Set-Cookie"].split(";")[0]
            csrf = csrf_cookie.split("=", 1)[1]
        # A token without `api: true` opens no session; the right one does, and `next` stays on this server.
        status, headers = post("/login", {"token": AGENT, "csrf": csrf, "next": ""}, csrf_cookie)
        assert status == 403 and not [c for c in headers.get_all("Set-Cookie", []) if "gradwatch_session=" in c]
        for hostile, kept in (("//evil.example/x", "./"), ("https://evil.example", "./"), ("api/v1/runs", "./"),
                              ("incidents/abc?x=1", "./incidents/abc?x=1"), ("/?run=a", "./?run=a")):  # fmt: skip
            status, headers = post("/login", {"token": ONCALL, "csrf": csrf, "next": hostile}, csrf_cookie)
            assert status == 303 and headers["Location"] == kept, (hostile, headers)
        (session,) = [c.split(";")[0] for c in headers.get_all("Set-Cookie") if c.startswith("gradwatch_session=")]
        # The cookie opens the pages, never the API or a write; GET changes nothing (logout needs the POST).
        for path, status in (("/", 200), ("/api/v1/runs", 401), ("/logout", 200)):
            request = urllib.request.Request(app.http_url + path, headers={"Cookie": session})
            try:
                got = opener.open(request, timeout=WAIT_S).status
            except urllib.error.HTTPError as exc:
                got = exc.code
            assert got == status, path
        assert post("/api/v1/silences", {"run": "r"}, session)[0] == 401
        assert post("/logout", {"csrf": "guessed"}, session)[0] == 403
        request = urllib.request.Request(app.http_url + "/", headers={"Cookie": session})
        assert opener.open(request, timeout=WAIT_S).status == 200  # still signed in
        # The grant leaves the tokens file (a rotated Secret): its sessions end with it.
        tokens.write_text(f'tokens: [{{name: agent, token: "{AGENT}", jobs: ["*"]}}]\n')

        def signed_in() -> bool:
            try:
                return opener.open(urllib.request.Request(app.http_url + "/", headers={"Cookie": session}),
                                   timeout=WAIT_S).status == 200  # fmt: skip
            except urllib.error.HTTPError as exc:
                assert exc.code == 401
                return False

        # The tokens file is checked at most once a second.
        wait_until(lambda: not signed_in(), WAIT_S, what="the session to end with its grant", interval=0.1)
    finally:
        app.stop()


def test_pages_session_cookie_is_secure_behind_an_https_external_url(tmp_path: pathlib.Path) -> None:
    """Behind a TLS-terminating ingress (alerting.external_url https://...) the cookies are Secure, __Host-."""
    tokens = tmp_path / "tokens.yaml"
    tokens.write_text(f'tokens: [{{name: oncall, token: "{ONCALL}", api: true}}]\n')
    local = ServerConfig.local()
    alerting = dataclasses.replace(local.alerting, external_url="https://gw.example")
    config = dataclasses.replace(local, auth=AuthConfig(tokens_file=str(tokens)), alerting=alerting)
    app = ServerApp(config).start()
    try:
        with urllib.request.urlopen(app.http_url + "/login", timeout=WAIT_S) as response:
            (cookie,) = response.headers.get_all("Set-Cookie")
        attributes = {a.strip().split("=")[0].lower() for a in cookie.split(";")}
        assert cookie.startswith("__Host-gradwatch_login_csrf=") and {"secure", "httponly", "samesite"} <= attributes
        assert "SameSite=Strict" in cookie and "Path=/" in cookie
    finally:
        app.stop()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None
