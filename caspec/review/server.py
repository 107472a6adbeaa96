"""`caspec review SPEC` without `--keep`: a local web gallery for every manual review gate of a spec.

A stdlib ``ThreadingHTTPServer`` (no web framework) serving one self-contained page (``page.html``,
inline CSS/JS, no external assets) and a small JSON API:

* ``GET /api/gates`` -- every ``select`` step: its candidates (id, digest, image URL, prompt, seed, keep,
  scores, source image URL), the count required, the manifest path. A manual gate whose upstream is cached
  but whose manifest is not written yet gets one (as ``caspec review --step`` does); a gate whose upstream
  has not run yet is listed with "run `caspec run` first". A ``by: clip`` step is listed with CLIP's
  decision (``by: clip``, each candidate's ``auto_keep``, whether it ``passed`` the thresholds and ``why``
  not, ``overruled`` when the manifest's keep set is a person's): saving it writes the manifest exactly as a
  hand edit would, which replaces CLIP's decision on the next run (the keep set enters the step's key).
* ``POST /api/gates/<step>`` with ``{"keep": [ids], "revision": "..."?}`` -- validates the ids and writes
  the manifest atomically under a file lock (``<manifest>.lock``), so saves from two browsers or
  processes serialize: the last one wins, the file is never torn. With ``revision`` (what the page
  loaded) a save over someone else's newer save is refused with 409 (the page then offers to overwrite).
* ``GET /files/<root>/<path>`` -- only what the gallery shows: the candidates' and sources' images, the
  contact sheets and the manifests of this spec, as the gate listing handed their URLs out. Records, logs,
  checkpoints and any other file are a 404, and so is anything resolving outside the store (``store``), the
  spec's out folder (``out``) and its reviews folder (``reviews``): ``..``, encoded dots, absolute paths,
  symlinks pointing out.

Safety:

* every request carries the server's per-run secret token (printed once, in the URL ``caspec review`` shows,
  as Jupyter does): ``?token=`` (which also sets an ``HttpOnly``, ``SameSite=Strict`` cookie for the page's
  own requests), the cookie, or ``Authorization: token <t>``; it is compared in constant time;
* binds 127.0.0.1 by default and refuses a non-loopback address unless ``allow_remote``;
* the ``Host`` header must name a loopback name or a host allowed explicitly (the bound address, and
  ``allowed_hosts``), against DNS rebinding; a POST's ``Origin`` must be the same host and port;
* POST bodies must be JSON (so a foreign page cannot send one without a CORS preflight, which is never granted).
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import mimetypes
import os
import secrets
import socket
import sys
import threading
from http.cookies import SimpleCookie
from contextlib import nullcontext
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from filelock import FileLock, Timeout

from ..errors import CaspecError, UsageError
from ..exec.runner import UpstreamView, out_dir_for
from ..ops.selection import count_problem, sync_manifest
from ..plan.graph import CACHED, make_plan
from .manifest import Manifest, read_manifest, sheet_path, write_contact_sheet, write_manifest

PAGE = Path(__file__).with_name("page.html")
LOCAL_HOSTNAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
LOCK_TIMEOUT = 30.0
MAX_BODY = 1 << 20
COOKIE = "caspec-review-token"


class ApiError(Exception):
    def __init__(self, status: int, message: str, hint: str | None = None, **extra: Any):
        super().__init__(message)
        self.status, self.message, self.hint, self.extra = status, message, hint, extra

    def to_json(self) -> dict[str, Any]:
        return {"error": self.message, **({"hint": self.hint} if self.hint else {}), **self.extra}


def _is_loopback(host: str) -> bool:
    h = host.strip("[]")
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def _host_of(header: str) -> str:
    """Hostname part of a Host header value (``name:port``, ``[v6]:port``), lowercased."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _revision(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    except FileNotFoundError:
        return None


def _rel(path: Path) -> str:
    try:
        return os.path.relpath(path)
    except ValueError:  # pragma: no cover - other drive on Windows
        return str(path)


def _scores(img: dict[str, Any]) -> dict[str, float]:
    """CLIP (or other) scores an upstream op wrote into an image entry, if any."""
    out: dict[str, float] = {}
    raw = img.get("scores")
    if isinstance(raw, dict):
        out.update({str(k): v for k, v in raw.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    for k, v in img.items():
        if ("clip" in k or "score" in k) and k != "scores" and isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
    return out


def _seed_text(seed: Any) -> str | None:
    """A seed as a string: seeds reach 2**63, past what a JavaScript number holds exactly."""
    return None if seed is None else str(seed)


def _clip_decision(m: Manifest, c: Any) -> dict[str, Any]:
    """For a ``by: clip`` manifest: whether CLIP kept the candidate, whether it passed the thresholds and why."""
    auto = m.auto_keep
    if auto is None:
        return {}
    scores = c.meta.get("scores") if isinstance(c.meta.get("scores"), dict) else {}
    return {"auto_keep": c.digest in auto, "passed": scores.get("passed"), "why": scores.get("why")}


class ReviewApp:
    """The gallery's logic, independent of HTTP (the handler only routes and encodes)."""

    def __init__(self, loaded: Any, store: Any, *, spec_arg: str | None = None,
                 model_identity: dict[str, Any] | None = None):
        self.loaded = loaded
        self.store = store
        self.spec_arg = spec_arg or _rel(loaded.path)
        self._model_identity = model_identity
        self.roots: dict[str, Path] = {
            "store": Path(store.root),
            "out": loaded.dir / "out" / loaded.name,
            "reviews": loaded.dir / "reviews" / loaded.name,
        }
        self._plan_lock = threading.Lock()
        self._served: set[Path] = set()  # what the gate listings handed out URLs for: all /files/ serves
        self._served_lock = threading.Lock()

    # ------------------------------------------------------------------ files
    def resolve_file(self, url_path: str) -> Path | None:
        """The file a ``/files/<root>/<rel>`` URL names, or None when it is not inside an allowed root."""
        rest = unquote(url_path)
        if "\x00" in rest:
            return None
        name, _, rel = rest.partition("/")
        root = self.roots.get(name)
        if root is None or not rel or rel.startswith("/") or "\\" in rel:
            return None
        try:
            base = root.resolve()
            target = (base / rel).resolve()
        except (OSError, RuntimeError, ValueError):
            return None
        if target == base or not target.is_relative_to(base) or not target.is_file():
            return None
        with self._served_lock:
            return target if target in self._served else None

    def url_for(self, path: Path) -> str | None:
        """The URL the gallery shows ``path`` under (it is served from then on), or None outside the roots."""
        try:
            p = path.resolve()
        except OSError:
            return None
        for name, root in self.roots.items():
            base = root.resolve()
            if p.is_relative_to(base):
                with self._served_lock:
                    self._served.add(p)
                return f"/files/{name}/" + quote(p.relative_to(base).as_posix())
        return None

    def _image_urls(self, step_id: str, record: Any) -> dict[str, str]:
        """id -> URL of a step's images: the readable copy in out/ when current, else the store object."""
        out = out_dir_for(self.loaded, step_id)
        marker = out / ".caspec-key"
        fresh = marker.is_file() and marker.read_text().strip() == record.key
        urls = {}
        for img in record.result.get("images", []):
            path = out / img["file"] if fresh and (out / img["file"]).is_file() else record.file(img["file"])
            url = self.url_for(path)
            if url:
                urls[img["id"]] = url
        return urls

    # ------------------------------------------------------------------ gates
    def plan(self) -> Any:
        with self._plan_lock:
            plan = make_plan(self.loaded, self.store, model_identity=self._model_identity)
            self._model_identity = plan.model_identity
            return plan

    def _gate_nodes(self, plan: Any) -> list[Any]:
        """Every ``select`` step: manual reviews, and ``by: clip`` steps (CLIP's decision, which a person may
        overrule)."""
        return [n for n in plan.order() if n.gate is not None and getattr(n.step, "by", "manual") in ("manual", "clip")]

    @staticmethod
    def _by_clip(node: Any) -> bool:
        return getattr(node.step, "by", "manual") == "clip"

    def gates(self) -> list[dict[str, Any]]:
        plan = self.plan()
        return [self._gate_json(plan, node) for node in self._gate_nodes(plan)]

    def gate(self, step_id: str, plan: Any = None) -> dict[str, Any]:
        plan = plan or self.plan()
        node = plan.nodes.get(step_id)
        if node is None or node not in self._gate_nodes(plan):
            raise ApiError(404, f"no manual review step `{step_id}` in {self.loaded.path.name}")
        return self._gate_json(plan, node)

    def _sync(self, plan: Any, node: Any, *, locked: bool = False) -> tuple[Manifest | None, Any]:
        """The gate's manifest (created/reconciled from the cached upstream), and the upstream record."""
        source_id = node.upstream["source"]
        src = plan.nodes[source_id]
        record = self.store.get(src.key) if src.status == CACHED else None
        path: Path = node.gate.manifest
        if record is None:
            return read_manifest(path), None
        if self._by_clip(node):  # CLIP writes this manifest when the step runs: read it, never create it
            return read_manifest(path), record
        lock = nullcontext() if locked else FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT)
        with lock:
            m, _ = sync_manifest(path, spec_name=self.loaded.name, step_id=node.id, source_id=source_id,
                                 source=UpstreamView(record), count=node.step.count,
                                 source_out_dir=out_dir_for(self.loaded, source_id))
        return m, record

    def _gate_json(self, plan: Any, node: Any) -> dict[str, Any]:
        path: Path = node.gate.manifest
        source_id = node.upstream["source"]
        base = {"step": node.id, "source": source_id, "count": node.step.count, "manifest": str(path),
                "manifest_rel": _rel(path), "sheet_url": None, "candidates": [], "groups": [],
                "status": node.status, "rerun": f"caspec run {self.spec_arg}"}
        try:
            m, record = self._sync(plan, node)
        except CaspecError as exc:
            return {**base, "state": "error", "message": exc.message, "hint": exc.hint,
                    "revision": _revision(path)}
        if record is None:
            why = "; ".join(plan.nodes[source_id].reasons) or plan.nodes[source_id].status
            return {**base, "state": "not-run", "revision": _revision(path),
                    "message": f"step `{source_id}` has no candidates yet ({why}): run `caspec run {self.spec_arg}` first"}
        if m is None:  # by: clip, not run yet
            return {**base, "by": "clip", "state": "not-run", "revision": _revision(path),
                    "message": f"CLIP has not decided `{node.id}` yet: run `caspec run {self.spec_arg}` first"}
        urls = self._image_urls(source_id, record)
        images = {img["id"]: img for img in record.result.get("images", [])}
        root_urls, root_prompts = self._source_images(plan, source_id)
        cands, groups, index = [], [], {}
        for c in m.candidates:
            img = images.get(c.id, {})
            src = img.get("source", c.meta.get("source"))
            prompt = img.get("prompt", c.meta.get("prompt"))
            cands.append({"id": c.id, "digest": c.digest, "keep": c.keep, "image_url": urls.get(c.id),
                          "prompt": prompt, "seed": _seed_text(img.get("seed", c.meta.get("seed"))), "source": src,
                          "source_image_url": root_urls.get(src) if src else None,
                          "scores": {**_scores(c.meta), **_scores(img)}, **_clip_decision(m, c)})
            gkey = (src, prompt)
            if gkey not in index:
                index[gkey] = len(groups)
                groups.append({"prompt": prompt, "source": src,
                               "source_image_url": root_urls.get(src) if src else None,
                               "source_prompt": root_prompts.get(src) if src else None, "ids": []})
            groups[index[gkey]]["ids"].append(c.id)
        kept = len(m.kept())
        problem = count_problem(kept, node.step.count)
        if self._by_clip(node):
            auto = m.auto or {}
            overruled = m.auto_keep is not None and sorted(c.digest for c in m.kept()) != m.auto_keep
            base = {**base, "by": "clip", "overruled": overruled,
                    "clip": {k: auto.get(k) for k in ("model", "pretrained", "score", "settings", "warning")}}
            problem = problem if overruled else ""  # CLIP's own decision was checked when the step ran
        return {**base, "state": "ready" if not problem else "waiting", "candidates": cands, "groups": groups,
                "kept": kept, "problem": problem, "revision": _revision(path),
                "manifest_url": self.url_for(path) if path.exists() else None,
                "sheet_url": self.url_for(sheet_path(path)) if sheet_path(path).exists() else None}  # None outside the roots

    def _source_images(self, plan: Any, step_id: str) -> tuple[dict[str, str], dict[str, str]]:
        """Images of the step the reviewed candidates were made from (the root beside an edit), by id."""
        up = plan.nodes[step_id].upstream.get("source")
        if not up or plan.nodes[up].status != CACHED:
            return {}, {}
        record = self.store.get(plan.nodes[up].key)
        if record is None:
            return {}, {}
        prompts = {img["id"]: img.get("prompt") for img in record.result.get("images", [])}
        return self._image_urls(up, record), prompts

    # ------------------------------------------------------------------ save
    def save(self, step_id: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict) or not isinstance(body.get("keep"), list) \
                or not all(isinstance(i, str) for i in body["keep"]):
            raise ApiError(400, 'expected a JSON object {"keep": ["candidate id", ...]}')
        revision = body.get("revision")
        plan = self.plan()
        node = plan.nodes.get(step_id)
        if node is None or node not in self._gate_nodes(plan):
            raise ApiError(404, f"no manual review step `{step_id}` in {self.loaded.path.name}")
        path: Path = node.gate.manifest
        wanted = list(dict.fromkeys(body["keep"]))
        try:
            with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT):
                self._save_locked(plan, node, path, wanted, revision)
        except Timeout:
            raise ApiError(503, f"`{_rel(path)}` is locked by another save", hint="try again") from None
        state = self.gate(step_id)
        if state.get("problem"):
            msg = f"saved `{_rel(path)}`; {state['problem']}"
        elif state.get("by") == "clip":
            msg = (f"saved — your decision replaces CLIP's: re-run `caspec run {self.spec_arg}` (this step and what "
                   "follows it re-run)" if state.get("overruled") else
                   f"saved — CLIP's own decision again: re-run `caspec run {self.spec_arg}`")
        else:
            msg = f"saved — re-run `caspec run {self.spec_arg}`"
        return {"message": msg, "gate": state}

    def _save_locked(self, plan: Any, node: Any, path: Path, wanted: list[str], revision: Any) -> None:
        step_id = node.id
        try:
            m, record = self._sync(plan, node, locked=True)
        except CaspecError as exc:
            raise ApiError(409, exc.message, exc.hint) from None
        if m is None or record is None:
            raise ApiError(409, f"`{step_id}` has nothing to review yet",
                           hint=f"run `caspec run {self.spec_arg}` first")
        if revision is not None and revision != (current := _revision(path)):
            raise ApiError(409, f"`{_rel(path)}` changed since this page loaded it (someone else saved?)",
                           hint="save again to overwrite it, or reload to see the other decision",
                           revision=current)
        ids = m.by_id()
        unknown = [w for w in wanted if w not in ids]
        if unknown:
            raise ApiError(400, f"unknown candidate id(s) for `{step_id}`: {', '.join(unknown)}",
                           hint=f"ids: {', '.join(ids)}")
        keep = set(wanted)
        for c in m.candidates:
            c.keep = c.id in keep
        write_manifest(m)
        write_contact_sheet(m)


# ---------------------------------------------------------------------- HTTP
class _Handler(BaseHTTPRequestHandler):
    server: "ReviewServer"
    server_version = "caspec-review"
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: Any) -> None:
        if self.server.verbose:
            sys.stderr.write("review: " + (fmt % args) + "\n")

    # -- checks
    def _host_ok(self) -> bool:
        host = self.headers.get("Host")
        return host is not None and _host_of(host) in self.server.hosts

    def _origin_ok(self) -> bool:
        origin = self.headers.get("Origin")
        if origin is None:
            return True
        parts = urlsplit(origin)
        hostname = parts.hostname or ""
        return parts.scheme == "http" and (hostname in self.server.hosts or f"[{hostname}]" in self.server.hosts) \
            and parts.port == self.server.server_address[1]

    def _token_given(self) -> str | None:
        """The token the request carries: ``?token=``, the cookie, or ``Authorization: token <t>``."""
        query = parse_qs(urlsplit(self.path).query).get("token")
        if query:
            return query[0]
        auth = self.headers.get("Authorization") or ""
        scheme, _, value = auth.partition(" ")
        if scheme.lower() in ("token", "bearer") and value:
            return value.strip()
        cookie = SimpleCookie()
        try:
            cookie.load(self.headers.get("Cookie") or "")
        except Exception:  # noqa: BLE001 - a malformed cookie header is no token
            return None
        return cookie[COOKIE].value if COOKIE in cookie else None

    def _authorized(self) -> bool:
        given = self._token_given()
        return given is not None and hmac.compare_digest(given.encode("utf-8", "replace"),
                                                         self.server.token.encode("utf-8"))

    def _refuse(self) -> None:
        """403 for a foreign Host, 401 without the token (no page, no data, nothing written)."""
        if not self._host_ok():
            return self._error(403, "this review server answers only to its own host names (Host header refused)")
        return self._error(401, "open the URL `caspec review` printed: it carries this server's token")

    # -- responses
    def _send(self, status: int, body: bytes, ctype: str, extra: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: Any) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    # -- routes
    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET()

    def do_GET(self) -> None:  # noqa: N802
        if not self._host_ok() or not self._authorized():
            return self._refuse()
        path = urlsplit(self.path).path
        try:
            if path in ("/", "/index.html"):
                csp = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; "
                       "script-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'")
                cookie = f"{COOKIE}={self.server.token}; Path=/; HttpOnly; SameSite=Strict"
                return self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8",
                                  {"Content-Security-Policy": csp, "Set-Cookie": cookie})
            if path == "/api/gates":
                return self._json(200, {"spec": self.server.app.loaded.name,
                                        "spec_path": self.server.app.spec_arg,
                                        "gates": self.server.app.gates()})
            if path.startswith("/api/gates/"):
                return self._json(200, self.server.app.gate(unquote(path[len("/api/gates/"):])))
            if path.startswith("/files/"):
                return self._file(path[len("/files/"):])
            if path == "/favicon.ico":
                return self._send(204, b"", "image/x-icon")
            return self._error(404, "not found")
        except ApiError as exc:
            return self._json(exc.status, exc.to_json())
        except CaspecError as exc:
            return self._json(500, {"error": exc.message, "hint": exc.hint})

    def _file(self, rest: str) -> None:
        target = self.server.app.resolve_file(rest)
        if target is None:
            return self._error(404, "not found")
        data = target.read_bytes()
        ctype = mimetypes.guess_type(target.name)[0]
        if ctype is None:
            ctype = ("image/png" if data.startswith(b"\x89PNG") else "image/jpeg" if data.startswith(b"\xff\xd8")
                     else "image/webp" if data[8:12] == b"WEBP" else "application/octet-stream")
        extra = {"Content-Security-Policy": "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'"}
        self._send(200, data, ctype, extra)

    def do_POST(self) -> None:  # noqa: N802
        if not self._host_ok() or not self._authorized():
            return self._refuse()
        if not self._origin_ok():
            return self._error(403, "cross-origin request refused")
        path = urlsplit(self.path).path
        if not path.startswith("/api/gates/"):
            return self._error(404, "not found")
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            return self._error(415, "send JSON (Content-Type: application/json)")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            return self._error(400, "bad Content-Length")
        if length > MAX_BODY:
            return self._error(413, "request too large")
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (ValueError, UnicodeDecodeError):
            return self._error(400, "the body is not valid JSON")
        try:
            self._json(200, self.server.app.save(unquote(path[len("/api/gates/"):]), body))
        except ApiError as exc:
            self._json(exc.status, exc.to_json())
        except CaspecError as exc:
            self._json(500, {"error": exc.message, "hint": exc.hint})


class ReviewServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: ReviewApp, *, allow_remote: bool, verbose: bool = False,
                 token: str | None = None, allowed_hosts: tuple[str, ...] = ()):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.app, self.allow_remote, self.verbose = app, allow_remote, verbose
        self.token = token or secrets.token_urlsafe(32)
        super().__init__(address, _Handler)
        bound = str(self.server_address[0])
        named = {h.lower() for h in allowed_hosts} | ({bound, f"[{bound}]"} if bound not in ("0.0.0.0", "::") else set())
        self.hosts = frozenset(LOCAL_HOSTNAMES | named)
        """Host header names this server answers to: loopback names, the bound address, ``allowed_hosts``."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, TimeoutError)):
            return  # a browser that closed its connection early: nothing to report
        super().handle_error(request, client_address)

    @property
    def base_url(self) -> str:
        """``http://host:port`` (without the token)."""
        host, port = self.server_address[:2]
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}"

    @property
    def url(self) -> str:
        """The gallery's URL with its token: what a person opens (``caspec review`` prints it once)."""
        return f"{self.base_url}/?token={self.token}"


def make_server(loaded: Any, store: Any, *, host: str = "127.0.0.1", port: int = 0, allow_remote: bool = False,
                spec_arg: str | None = None, model_identity: dict[str, Any] | None = None,
                verbose: bool = False, allowed_hosts: tuple[str, ...] = ()) -> ReviewServer:
    """A bound (not yet serving) review server; call ``serve_forever()`` (port 0 picks a free port)."""
    if not allow_remote and not _is_loopback(host):
        raise UsageError(f"refusing to serve the review page on `{host}`: anyone who can reach it could change "
                         f"your review decisions",
                         hint="use the default 127.0.0.1 (reach it from elsewhere with `ssh -L PORT:127.0.0.1:PORT`), "
                              "or pass --allow-remote on a trusted network")
    app = ReviewApp(loaded, store, spec_arg=spec_arg, model_identity=model_identity)
    try:
        return ReviewServer((host, port), app, allow_remote=allow_remote, verbose=verbose, allowed_hosts=allowed_hosts)
    except OSError as exc:
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                         hint="pick another port with --port (0 picks a free one)") from None


def serve(loaded: Any, store: Any, host: str = "127.0.0.1", port: int = 8765, allow_remote: bool = False,
          *, spec_arg: str | None = None, allowed_hosts: tuple[str, ...] = ()) -> int:
    """Run the gallery until Ctrl-C; returns the exit code (0)."""
    server = make_server(loaded, store, host=host, port=port, allow_remote=allow_remote, spec_arg=spec_arg,
                         allowed_hosts=allowed_hosts)
    gates = server.app.gates()
    waiting = sum(1 for g in gates if g["state"] in ("waiting", "not-run"))
    print(f"review: {len(gates)} review step(s) in {loaded.path.name}, {waiting} waiting", file=sys.stderr)
    print(f"review: open {server.url}  (Ctrl-C to stop)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nreview: stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
