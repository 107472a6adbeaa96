"""The review gallery's server (no browser): API, atomic locked saves, path and host checks, concurrency."""
from __future__ import annotations

import http.client
from urllib.parse import quote
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import yaml

from caspec.errors import UsageError
from caspec.exec.runner import run
from caspec.plan.graph import AWAITING, make_plan
from caspec.review.manifest import read_manifest
from caspec.review.server import make_server
from caspec.spec.load import load_spec
from caspec.store import LocalStore

from fakeops import fake_ops

MODEL = {"k": 1}
SPEC = """
version: 1
name: t
roots:
  a: {prompt: "alpha", candidates: 2}
  b: {prompt: "beta", candidates: 1}
edits:
  ea: {from: a, prompts: ["red", "blue"], candidates: 1}
  eb: {from: b, prompts: ["green"], candidates: 1}
select:
  pick: {from: ea, count: 2}
"""
IDS = ["s0-p0-c0", "s0-p1-c0", "s1-p0-c0", "s1-p1-c0"]


@pytest.fixture(autouse=True)
def _fakes():
    with fake_ops():
        yield


def setup_spec(tmp: Path, *, run_it: bool = True):
    path = tmp / "t.yaml"
    path.write_text(textwrap.dedent(SPEC))
    loaded, store = load_spec(path), LocalStore(tmp / ".caspec")
    if run_it:
        summary = run(loaded, store, plan=make_plan(loaded, store, model_identity=MODEL))
        assert summary.exit_code == 3
    return loaded, store


@pytest.fixture
def served(tmp_path):
    loaded, store = setup_spec(tmp_path)
    server = make_server(loaded, store, port=0, model_identity=MODEL, spec_arg="t.yaml")
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server, loaded, store
    server.shutdown()
    server.server_close()


def request(server, method: str, path: str, body=None, headers=None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=20)
    hdrs = {"Host": f"127.0.0.1:{port}", "Authorization": f"token {server.token}"}
    if body is not None:
        hdrs["Content-Type"] = "application/json"
        body = json.dumps(body) if not isinstance(body, (bytes, str)) else body
    hdrs.update(headers or {})
    conn.request(method, path, body=body, headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    try:
        payload = json.loads(data) if resp.getheader("Content-Type", "").startswith("application/json") else data
    except ValueError:
        payload = data
    return resp.status, payload, resp


def manifest_path(tmp: Path) -> Path:
    return tmp / "reviews" / "t" / "pick.yaml"


def test_api_lists_gates_and_candidates(served, tmp_path):
    server, loaded, store = served
    status, data, _ = request(server, "GET", "/api/gates")
    assert status == 200 and data["spec"] == "t"
    [gate] = data["gates"]
    assert gate["step"] == "pick" and gate["source"] == "ea" and gate["count"] == 2
    assert gate["state"] == "waiting" and gate["kept"] == 0
    assert Path(gate["manifest"]) == manifest_path(tmp_path)
    assert [c["id"] for c in gate["candidates"]] == IDS
    c0 = gate["candidates"][0]
    # seeds travel as strings: they reach 2**63, past what a JavaScript number holds exactly
    assert c0["prompt"] == "red" and c0["seed"] == "0" and c0["keep"] is False and c0["source"] == "c000"
    assert len(c0["digest"]) == 64
    # the images are served, and are the candidates' bytes
    status, body, resp = request(server, "GET", c0["image_url"])
    assert status == 200 and body == b"alpha#0|red#0"
    assert c0["image_url"].startswith("/files/out/ea/")
    # the root each edit was made from, beside its group; groups are (root, prompt)
    status, body, _ = request(server, "GET", c0["source_image_url"])
    assert status == 200 and body == b"alpha#0"
    assert [(g["source"], g["prompt"], g["ids"]) for g in gate["groups"]] == [
        ("c000", "red", ["s0-p0-c0"]), ("c000", "blue", ["s0-p1-c0"]),
        ("c001", "red", ["s1-p0-c0"]), ("c001", "blue", ["s1-p1-c0"])]
    # the page itself: self-contained, no external URL
    status, page, resp = request(server, "GET", "/")
    assert status == 200 and b"data-testid" in page
    assert b"http://" not in page and b"https://" not in page and b"//cdn" not in page
    assert "default-src 'none'" in resp.getheader("Content-Security-Policy")


def test_gate_before_run_and_manifest_created_on_demand(tmp_path):
    loaded, store = setup_spec(tmp_path, run_it=False)
    server = make_server(loaded, store, model_identity=MODEL, spec_arg="t.yaml")
    try:
        [gate] = server.app.gates()
        assert gate["state"] == "not-run" and "run `caspec run t.yaml` first" in gate["message"]
        assert not manifest_path(tmp_path).exists()
        run(loaded, store, plan=make_plan(loaded, store, model_identity=MODEL))
        manifest_path(tmp_path).unlink()
        [gate] = server.app.gates()  # upstream cached, manifest missing: created like `caspec review --step`
        assert gate["state"] == "waiting" and manifest_path(tmp_path).exists()
        assert [c.id for c in read_manifest(manifest_path(tmp_path)).candidates] == IDS
    finally:
        server.server_close()


def test_save_writes_manifest_and_decides_gate(served, tmp_path):
    server, loaded, store = served
    assert make_plan(loaded, store, model_identity=MODEL).nodes["pick"].status == AWAITING
    _, data, _ = request(server, "GET", "/api/gates")
    rev = data["gates"][0]["revision"]
    status, data, _ = request(server, "POST", "/api/gates/pick", {"keep": ["s0-p1-c0", "s1-p0-c0"], "revision": rev})
    assert status == 200, data
    assert data["message"] == "saved — re-run `caspec run t.yaml`"
    assert data["gate"]["kept"] == 2 and data["gate"]["state"] == "ready"
    m = read_manifest(manifest_path(tmp_path))
    assert sorted(c.id for c in m.kept()) == ["s0-p1-c0", "s1-p0-c0"]
    assert "s0-p1-c0" in (tmp_path / "reviews" / "t" / "pick.html").read_text()
    node = make_plan(loaded, store, model_identity=MODEL).nodes["pick"]
    assert node.status == "run" and node.gate.decided
    assert not list(manifest_path(tmp_path).parent.glob("*.tmp*"))  # no temp files left behind
    # a partial decision saves too, with the count problem as the message
    status, data, _ = request(server, "POST", "/api/gates/pick", {"keep": ["s0-p0-c0"]})
    assert status == 200 and "needs exactly 2" in data["message"]
    assert make_plan(loaded, store, model_identity=MODEL).nodes["pick"].status == AWAITING


def test_stale_revision_conflicts(served, tmp_path):
    server, *_ = served
    _, data, _ = request(server, "GET", "/api/gates")
    rev = data["gates"][0]["revision"]
    assert request(server, "POST", "/api/gates/pick", {"keep": IDS[:2]})[0] == 200  # someone else saved
    status, data, _ = request(server, "POST", "/api/gates/pick", {"keep": IDS[2:], "revision": rev})
    assert status == 409 and "changed since" in data["error"] and data["revision"] != rev
    status, _, _ = request(server, "POST", "/api/gates/pick", {"keep": IDS[2:], "revision": data["revision"]})
    assert status == 200
    assert sorted(c.id for c in read_manifest(manifest_path(tmp_path)).kept()) == IDS[2:]


def test_bad_posts(served, tmp_path):
    server, *_ = served
    before = manifest_path(tmp_path).read_bytes()
    status, data, _ = request(server, "POST", "/api/gates/pick", {"keep": ["s0-p0-c0", "nope"]})
    assert status == 400 and "nope" in data["error"]
    assert request(server, "POST", "/api/gates/pick", {"keep": "s0-p0-c0"})[0] == 400
    assert request(server, "POST", "/api/gates/pick", b"{not json")[0] == 400
    assert request(server, "POST", "/api/gates/nosuch", {"keep": []})[0] == 404
    assert request(server, "POST", "/api/gates/ea", {"keep": []})[0] == 404
    # a form post (no CORS preflight) and a cross-origin post are refused
    assert request(server, "POST", "/api/gates/pick", b'{"keep": []}', {"Content-Type": "text/plain"})[0] == 415
    assert request(server, "POST", "/api/gates/pick", {"keep": []}, {"Origin": "http://evil.example"})[0] == 403
    assert manifest_path(tmp_path).read_bytes() == before


@pytest.mark.parametrize("path", [
    "/files/out/../../../t.yaml",
    "/files/out/%2e%2e/%2e%2e/%2e%2e/t.yaml",
    "/files/out/%2E%2E%2F%2E%2E%2F%2E%2E%2Ft.yaml",
    "/files/out/ea/..%2f..%2f..%2ft.yaml",
    "/files/store/../t.yaml",
    "/files//etc/passwd",
    "/files/out//etc/passwd",
    "/files/out/%2fetc%2fpasswd",
    "/files/etc/passwd",
    "/files/reviews/../../t.yaml",
    "/files/out/link-out/t.yaml",
    "/files/out/escape.png",
    "/files/out/ea",
    "/files/out/",
    "/files/out/ea/c000.png%00.png",
    "/t.yaml",
    "/../t.yaml",
])
def test_path_traversal_is_404(served, tmp_path, path):
    server, *_ = served
    out = tmp_path / "out" / "t"
    (out / "link-out").symlink_to(tmp_path)                 # a folder symlink pointing out
    (out / "escape.png").symlink_to(tmp_path / "t.yaml")    # a file symlink pointing out
    status, body, _ = request(server, "GET", path)
    assert status == 404, (path, body)


def test_only_what_the_gallery_shows_is_served(served, tmp_path):
    """Images, contact sheets and manifests the gate listing handed out; never records, logs, other objects."""
    server, loaded, store = served
    assert request(server, "GET", "/files/reviews/pick.yaml")[0] == 404  # not handed out yet
    status, listing, _ = request(server, "GET", "/api/gates")
    gate = listing["gates"][0]
    shown = [gate["manifest_url"], gate["sheet_url"]] + [c["image_url"] for c in gate["candidates"]]
    assert "/files/reviews/pick.yaml" in shown and "/files/reviews/pick.html" in shown
    for url in shown:
        assert request(server, "GET", url)[0] == 200, url
    for path in list(store.root.rglob("*"))[:200]:  # the store's records, logs, objects not shown: all 404
        rel = path.relative_to(store.root).as_posix()
        if path.is_file() and f"/files/store/{rel}" not in shown:
            assert request(server, "GET", "/files/store/" + quote(rel))[0] == 404, rel


@pytest.mark.parametrize("host", ["evil.example", "evil.example:80", "192.168.1.5", "127.0.0.1.evil.example", ""])
def test_non_local_host_header_is_403(served, host):
    server, *_ = served
    port = server.server_address[1]
    hdr = f"{host}:{port}" if host and ":" not in host else host
    assert request(server, "GET", "/api/gates", headers={"Host": hdr})[0] == 403
    assert request(server, "GET", "/", headers={"Host": hdr})[0] == 403
    assert request(server, "POST", "/api/gates/pick", {"keep": []}, {"Host": hdr})[0] == 403


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "[::1]"])
def test_local_host_headers_pass(served, host):
    server, *_ = served
    port = server.server_address[1]
    assert request(server, "GET", "/api/gates", headers={"Host": f"{host}:{port}"})[0] == 200


def test_binding_non_loopback_needs_allow_remote(tmp_path):
    loaded, store = setup_spec(tmp_path, run_it=False)
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.com"):
        with pytest.raises(UsageError) as exc:
            make_server(loaded, store, host=host, port=0, model_identity=MODEL)
        assert "--allow-remote" in exc.value.hint
    server = make_server(loaded, store, host="0.0.0.0", port=0, allow_remote=True, model_identity=MODEL)
    server.server_close()
    server = make_server(loaded, store, host="localhost", port=0, model_identity=MODEL)
    server.server_close()


def test_concurrent_saves_from_threads_leave_a_whole_decision(served, tmp_path):
    server, *_ = served
    decisions = [IDS[:2], IDS[2:], [IDS[0], IDS[3]], [IDS[1], IDS[2]], IDS[1:3], [IDS[0], IDS[2]]]
    results: list[int] = []

    def save(keep):
        for _ in range(4):
            results.append(request(server, "POST", "/api/gates/pick", {"keep": keep})[0])

    threads = [threading.Thread(target=save, args=(d,)) for d in decisions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * len(results)
    m = read_manifest(manifest_path(tmp_path))
    assert [c.id for c in m.candidates] == IDS
    assert sorted(c.id for c in m.kept()) in [sorted(d) for d in decisions]


SAVER = """
import sys, threading
sys.path.insert(0, {tests!r})
from fakeops import fake_ops
from caspec.review.server import ReviewApp
from caspec.spec.load import load_spec
from caspec.store import LocalStore
keep = sys.argv[1].split(",")
with fake_ops():
    app = ReviewApp(load_spec({spec!r}), LocalStore({store!r}), model_identity={{"k": 1}})
    for _ in range(5):
        app.save("pick", {{"keep": keep}})
print("ok")
"""


def test_concurrent_saves_from_processes_and_server(served, tmp_path):
    server, loaded, store = served
    script = SAVER.format(tests=str(Path(__file__).parent), spec=str(loaded.path), store=str(store.root))
    decisions = [IDS[:2], IDS[2:], [IDS[0], IDS[3]]]
    procs = [subprocess.Popen([sys.executable, "-c", script, ",".join(d)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for d in decisions]
    readers_ok = []

    def read_loop():  # readers never see a torn manifest
        for _ in range(15):
            status, data, _ = request(server, "GET", "/api/gates")
            readers_ok.append(status == 200 and data["gates"][0]["state"] in ("waiting", "ready"))

    reader = threading.Thread(target=read_loop)
    reader.start()
    for _ in range(5):
        assert request(server, "POST", "/api/gates/pick", {"keep": IDS[1:3]})[0] == 200
    reader.join()
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "ok", err
    assert all(readers_ok)
    m = read_manifest(manifest_path(tmp_path))
    assert [c.id for c in m.candidates] == IDS
    assert sorted(c.id for c in m.kept()) in [sorted(d) for d in decisions + [IDS[1:3]]]
    data = yaml.safe_load(manifest_path(tmp_path).read_text())
    assert data["step"] == "pick" and len(data["candidates"]) == 4


def _from(source: str, server, method: str, path: str, body=None, headers=None):
    """A request from another address (a loopback alias) to the server's bound address."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=20, source_address=(source, 0))
    hdrs = {"Content-Type": "application/json"} if body is not None else {}
    hdrs.update(headers or {})
    conn.request(method, path, body=None if body is None else json.dumps(body), headers=hdrs)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data, resp


def test_a_shared_gallery_needs_its_token_and_an_allowed_host(tmp_path):
    """`--allow-remote` on a network: a colleague at another address gets in only with the token and a Host
    allowed explicitly; a foreign Host, a missing or wrong token, or a foreign Origin change nothing."""
    loaded, store = setup_spec(tmp_path)
    server = make_server(loaded, store, host="127.0.0.3", port=0, allow_remote=True, model_identity=MODEL,
                         spec_arg="t.yaml", allowed_hosts=("gallery.lan",))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        port = server.server_address[1]
        ok_host = {"Host": f"gallery.lan:{port}"}
        token = {"Authorization": f"token {server.token}"}
        assert _from("127.0.0.2", server, "GET", "/api/gates", headers={**ok_host, **token})[0] == 200
        before = manifest_path(tmp_path).read_bytes()
        flip = {"keep": ["s0-p1-c0", "s1-p0-c0"]}
        for headers, status in (({"Host": f"evil.example:{port}", **token}, 403),
                                (ok_host, 401),
                                ({**ok_host, "Authorization": "token " + "x" * len(server.token)}, 401),
                                ({**ok_host, "Cookie": "caspec-review-token=nope"}, 401),
                                ({**ok_host, **token, "Origin": "http://evil.example"}, 403)):
            assert _from("127.0.0.2", server, "POST", "/api/gates/pick", flip, headers)[0] == status, headers
            assert manifest_path(tmp_path).read_bytes() == before
        assert _from("127.0.0.2", server, "GET", "/", headers=ok_host)[0] == 401  # no page without the token
        # the URL printed once carries the token and sets the cookie the page's requests then carry
        assert server.url.startswith(f"http://127.0.0.3:{port}/?token=")
        status, _, resp = _from("127.0.0.2", server, "GET", f"/?token={server.token}", headers=ok_host)
        cookie = resp.getheader("Set-Cookie")
        assert status == 200 and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        jar = {"Cookie": cookie.split(";")[0], **ok_host}
        assert _from("127.0.0.2", server, "POST", "/api/gates/pick", flip,
                     {**jar, "Origin": f"http://gallery.lan:{port}"})[0] == 200
        assert manifest_path(tmp_path).read_bytes() != before
    finally:
        server.shutdown()
        server.server_close()
