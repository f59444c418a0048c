"""API keys: hashed at rest, several, revocable, compared in constant time, rate limited and queue-capped
per key, and required on every endpoint that reads or changes jobs."""

from __future__ import annotations

import hmac
import json
import os
import uuid

import pytest
from hardening_helpers import data_uri, keys_file, png_bytes, rw_upscale

from ccsr.api import auth
from ccsr.api.auth import hash_key

FAL = "/fal-ai/ccsr"
KEY_A, KEY_B = "key-alpha-" + "a" * 20, "key-bravo-" + "b" * 20
# served without a key by design: health, the API description, images behind unguessable UUIDs, the
# playground's static shell (its job endpoints check keys), the fal storage PUT (a per-upload token)
PUBLIC = {
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
    ("GET", "/images/{name}"),
    ("HEAD", "/images/{name}"),
    ("GET", "/"),
    ("GET", "/playground/static/{name}"),
    ("GET", "/playground/config"),
    ("GET", "/playground/models"),
    ("GET", "/favicon.ico"),
    ("PUT", "/storage/upload/{upload_id}"),
}


def _routes(app):
    """(method, path template) of every HTTP route, including those of included routers."""
    out = set()
    stack = list(app.routes)
    while stack:
        r = stack.pop()
        if hasattr(r, "effective_route_contexts"):
            stack.extend(r.effective_route_contexts())
            continue
        path = getattr(r, "path_format", None) or getattr(r, "path", None)
        for m in getattr(r, "methods", None) or ():
            if path:
                out.add((m, path))
    return out


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_every_route_needs_a_key(make_client):
    c = make_client(api_keys=[KEY_A])
    routes = _routes(c.app)
    assert ("POST", "/v1") in routes and ("PUT", "/fal-ai/ccsr/requests/{request_id}/cancel") in routes
    open_routes = []
    for method, path in sorted(routes - PUBLIC):
        if method == "HEAD":
            continue
        url = path.replace("{path}", "x").replace("{name}", "x")
        url = url.replace("{request_id}", str(uuid.uuid4())).replace("{upload_id}", str(uuid.uuid4()))
        r = c.request(method, url, content=b'[{"taskType": "ping"}]', headers={"content-type": "application/json"})
        if r.status_code != 401:
            open_routes.append((method, path, r.status_code))
    assert not open_routes
    with c.websocket_connect("/v1") as ws:
        ws.send_text(json.dumps([rw_upscale("x" * 40)]))
        assert json.loads(ws.receive_text())["errors"][0]["code"] == "missingApiKey"
        ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": "wrong"}]))
        assert json.loads(ws.receive_text())["errors"][0]["code"] == "invalidApiKey"


def test_keys_are_hashed_at_rest(make_client):
    c = make_client(api_keys=[KEY_A, KEY_B])
    settings = c.app.state.settings
    assert settings.api_keys == []
    blob = repr(vars(settings)) + repr(vars(settings.keyring()))
    assert KEY_A not in blob and KEY_B not in blob and hash_key(KEY_A) in blob
    for k in (KEY_A, KEY_B):  # several keys, each accepted
        assert c.post("/v1", json=[{"taskType": "ping"}], headers=_bearer(k)).status_code == 200
        assert c.get(f"{FAL}/requests/{uuid.uuid4()}/status", headers={"Authorization": f"Key {k}"}).status_code == 404
    r = c.post("/v1", json=[{"taskType": "ping"}], headers=_bearer(KEY_A + "x"))
    assert r.status_code == 401 and r.json()["errors"][0]["code"] == "invalidApiKey"


def test_constant_time_comparison_visits_every_key(monkeypatch, tmp_path):
    ring = auth.KeyRing([KEY_A, KEY_B, "c" * 30])
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert ring.lookup(KEY_A) is not None
    assert len(calls) == 3  # no early exit on the first match
    calls.clear()
    assert ring.lookup("nope") is None and len(calls) == 3


def test_keys_file_revocation(make_client, tmp_path):
    path = keys_file(tmp_path / "keys", {KEY_A: "alpha", KEY_B: "bravo"})
    c = make_client(api_keys_file=str(path))
    ring = c.app.state.settings.keyring()
    ping = [{"taskType": "ping"}]
    assert c.post("/v1", json=ping, headers=_bearer(KEY_B)).status_code == 200
    keys_file(path, {KEY_A: "alpha"})  # bravo revoked
    os.utime(path, ns=(1, 1))  # a changed mtime, whatever the clock's resolution
    ring._checked = 0.0  # the next request re-checks (normally at most once a second)
    r = c.post("/v1", json=ping, headers=_bearer(KEY_B))
    assert r.status_code == 401, r.text
    assert c.post("/v1", json=ping, headers=_bearer(KEY_A)).status_code == 200
    keys_file(path, {KEY_A: "alpha", KEY_B: "bravo"})
    ring.reload()  # what SIGHUP does
    assert c.post("/v1", json=ping, headers=_bearer(KEY_B)).status_code == 200


def test_keys_file_revocation_reaches_an_open_websocket_session(make_client, tmp_path):
    """A Runware socket authenticates once, but each task is admitted with the session's key again: a key revoked
    while the socket is open is refused at its next task, in Runware's shape."""
    path = keys_file(tmp_path / "keys", {KEY_A: "alpha", KEY_B: "bravo"})
    c = make_client(api_keys_file=str(path))
    ring = c.app.state.settings.keyring()
    with c.websocket_connect("/v1") as ws:
        ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": KEY_B}]))
        assert "data" in json.loads(ws.receive_text())
        ws.send_text(json.dumps([{"taskType": "getResponse", "taskUUID": "before"}]))
        assert json.loads(ws.receive_text())["errors"][0]["code"] != "invalidApiKey"  # admitted (unknown task)
        keys_file(path, {KEY_A: "alpha"})  # bravo revoked
        os.utime(path, ns=(1, 1))
        ring._checked = 0.0
        ws.send_text(json.dumps([{"taskType": "getResponse", "taskUUID": "after"}]))
        err = json.loads(ws.receive_text())["errors"][0]
        assert err["code"] == "invalidApiKey" and err["taskUUID"] == "after", err


def test_per_key_rate_limit(make_client, tmp_path):
    path = keys_file(tmp_path / "keys", {KEY_A: "alpha rate=0.5 burst=2", KEY_B: "bravo"})
    c = make_client(api_keys_file=str(path))
    ping = [{"taskType": "ping"}]
    codes = [c.post("/v1", json=ping, headers=_bearer(KEY_A)).status_code for _ in range(2)]
    assert codes == [200, 200]
    r = c.post("/v1", json=ping, headers=_bearer(KEY_A))
    assert r.status_code == 429 and r.json()["errors"][0]["code"] == "rateLimitExceeded"
    assert int(r.headers["retry-after"]) >= 1
    r = c.get(f"{FAL}/requests/{uuid.uuid4()}/status", headers={"Authorization": f"Key {KEY_A}"})
    assert r.status_code == 429 and r.json()["error_type"] == "rate_limited" and r.headers["retry-after"]
    assert c.post("/v1", json=ping, headers=_bearer(KEY_B)).status_code == 200  # other keys unaffected
    with c.websocket_connect("/v1") as ws:
        ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": KEY_A}]))
        assert "data" in json.loads(ws.receive_text())
        ws.send_text(json.dumps([{"taskType": "getResponse", "taskUUID": "t"}]))
        err = json.loads(ws.receive_text())["errors"][0]
        assert err["code"] == "rateLimitExceeded" and err["taskUUID"] == "t"
    # The playground's and the fal storage's own endpoints draw on the same per-key budget.
    r = c.post(f"/playground/cancel/{uuid.uuid4()}", headers=_bearer(KEY_A))
    assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
    r = c.post("/storage/upload/initiate", json={"content_type": "image/png", "file_name": "a.png"},
               headers={"Authorization": f"Key {KEY_A}"})
    assert r.status_code == 429 and r.headers["retry-after"]


@pytest.mark.parametrize("protocol", ["runware", "fal"])
def test_per_key_queue_quota(make_client, runner, tmp_path, protocol):
    path = keys_file(tmp_path / "keys", {KEY_A: "alpha quota=1", KEY_B: "bravo"})
    c = make_client(api_keys_file=str(path))
    img = data_uri(png_bytes())
    runner.gate.clear()

    def submit(key):
        if protocol == "runware":
            return c.post("/v1", json=[rw_upscale(img)], headers=_bearer(key))
        return c.post(f"/queue{FAL}", json={"image_url": img}, headers={"Authorization": f"Key {key}"})

    first = submit(KEY_A)
    assert first.status_code == 200, first.text
    r = submit(KEY_A)
    assert r.status_code == 429 and r.headers["retry-after"]
    if protocol == "runware":
        assert r.json()["errors"][0]["code"] == "rateLimitExceeded"
    else:
        assert r.json()["error_type"] == "rate_limited"
    assert submit(KEY_B).status_code == 200  # quotas are per key
    runner.gate.set()
    engine = c.app.state.engine
    import time

    deadline = time.monotonic() + 10
    while engine.store.active_count() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert submit(KEY_A).status_code == 200  # the finished job freed the slot


def test_websocket_and_rest_share_a_keys_rate_limit_and_quota(make_client, runner, tmp_path):
    """One admission for every transport: a key's rate-limit tokens and its queue quota are one budget, whether it
    calls over REST or over a WebSocket session (authenticated once, each task admitted)."""
    path = keys_file(tmp_path / "keys", {KEY_A: "alpha rate=0.01 burst=4 quota=1", KEY_B: "bravo quota=1"})
    c = make_client(api_keys_file=str(path))
    img = data_uri(png_bytes())
    runner.gate.clear()  # submitted jobs stay active: each holds its key's quota
    with c.websocket_connect("/v1") as ws:
        ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": KEY_A}]))
        assert "data" in json.loads(ws.receive_text())
        # token 1 (REST): a job, which takes alpha's one quota slot
        assert c.post("/v1", json=[rw_upscale(img)], headers=_bearer(KEY_A)).status_code == 200
        # token 2 (WS): admitted, but the quota is full from REST's job
        task = rw_upscale(img)
        ws.send_text(json.dumps([task]))
        err = json.loads(ws.receive_text())["errors"][0]
        assert (err["code"], err["taskUUID"]) == ("rateLimitExceeded", task["taskUUID"]), err
        assert "alpha already has 1 of 1 jobs" in err["message"], err  # REST's job, counted for the WS task
        # tokens 3 (WS) and 4 (REST) spend the burst between them; the next call, on either, is refused
        ws.send_text(json.dumps([{"taskType": "getResponse", "taskUUID": task["taskUUID"]}]))
        assert json.loads(ws.receive_text())["errors"][0]["code"] == "taskNotFound"
        assert c.post("/v1", json=[{"taskType": "ping"}], headers=_bearer(KEY_A)).status_code == 200
        ws.send_text(json.dumps([{"taskType": "getResponse", "taskUUID": task["taskUUID"]}]))
        err = json.loads(ws.receive_text())["errors"][0]
        assert err["code"] == "rateLimitExceeded" and int(err["retryAfter"]) >= 1, err
        r = c.post("/v1", json=[{"taskType": "ping"}], headers=_bearer(KEY_A))
        assert r.status_code == 429 and r.json()["errors"][0]["code"] == "rateLimitExceeded"

    with c.websocket_connect("/v1") as ws:  # and the other way round: a job over WS fills the quota for REST
        ws.send_text(json.dumps([{"taskType": "authentication", "apiKey": KEY_B}]))
        assert "data" in json.loads(ws.receive_text())
        task = rw_upscale(img)
        ws.send_text(json.dumps([task]))
        assert json.loads(ws.receive_text())["data"][0]["taskUUID"] == task["taskUUID"]
        r = c.post("/v1", json=[rw_upscale(img)], headers=_bearer(KEY_B))
        assert r.status_code == 429 and r.json()["errors"][0]["code"] == "rateLimitExceeded", r.text
        r = c.post(f"/queue{FAL}", json={"image_url": img}, headers={"Authorization": f"Key {KEY_B}"})
        assert r.status_code == 429 and r.json()["error_type"] == "rate_limited", r.text


def test_serve_options_reach_settings(tmp_path):
    import argparse

    from ccsr.api.serve import add_arguments, settings_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(
        [
            *("--api-key", KEY_A, "--api-keys-file", str(tmp_path / "k"), "--rate-limit", "2.5"),
            *("--key-max-queue", "3", "--max-tasks", "4", "--max-json-depth", "9", "--ws-idle-timeout", "7"),
            *("--max-body-bytes", "12345", "--log-format", "json", "--webhook-attempts", "2", "--drain-timeout", "9"),
        ]
    )
    s = settings_from_args(args)
    assert (s.rate_limit, s.key_max_queue, s.max_tasks, s.max_json_depth) == (2.5, 3, 4, 9)
    assert (s.ws_idle_timeout, s.body_limit(), s.frame_limit(), s.log_format) == (7, 12345, 12345, "json")
    assert (s.webhook_attempts, s.drain_timeout) == (2, 9)
    assert s.keys_required() and s.key_ok(KEY_A, "203.0.113.9") and s.api_keys == []


def test_keys_file_parsing_ignores_bad_lines():
    good = hash_key("x")
    entries = auth.parse_keys_file(f"# comment\n\nnot-a-digest\n{good} ci rate=3 burst=5 quota=2\n{good} q rate=zz\n")
    assert len(entries) == 1
    e = entries[0]
    assert (e.name, e.rate, e.burst, e.quota) == ("ci", 3.0, 5, 2)


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_every_setting_is_reached_by_its_flag_and_its_variable(monkeypatch, command):
    """One table declares each setting: its flag and its CCSR_* variable give the same value, and --help names both
    (``ccsr serve``'s rows and ``ccsr worker``'s)."""
    import argparse

    from ccsr import worker
    from ccsr.api import serve
    from ccsr.api.settings import Settings, options_for

    cli = serve if command == "serve" else worker
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    text = parser.format_help()
    for opt in options_for(command):
        kind = str(Settings.__dataclass_fields__[opt.name].type)
        raw = opt.choices[-1] if opt.choices else "a.example:1,b.example:2" if opt.many else "1" if opt.switch else (
            "7" if kind.startswith("int") else "2.5" if kind.startswith("float") else "/tmp/x")
        from_env = getattr(Settings.from_env({opt.env_names[0]: raw}), opt.name)
        argv = ([a for v in raw.split(",") for a in (opt.flag_name, v)] if opt.many else [opt.flag_name]
                if opt.switch else [opt.flag_name, raw])
        for name in opt.env_names:
            monkeypatch.delenv(name, raising=False)
        from_flag = getattr(cli.settings_from_args(parser.parse_args(argv)), opt.name)
        assert from_env == from_flag != getattr(Settings(), opt.name), opt.name
        if not opt.hidden:
            assert opt.flag_name in text and opt.env_names[0] in text, opt.name
