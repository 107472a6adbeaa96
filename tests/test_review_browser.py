"""The review gallery end to end in a real headless Chromium (Debian's `chromium`, driven by playwright).

Loads the page, clicks candidates, saves (button and keyboard), and checks the manifest on disk; asserts
the page requests nothing but the local server; keeps a screenshot in test-artifacts/review-gallery.png.
Chromium comes from `scripts/ensure-browser` (run here once if it is missing); the test skips, saying
why, only where neither the browser nor playwright can be had.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest

from caspec.exec.runner import run
from caspec.ops.base import Op, image_entry
from caspec.plan.graph import make_plan
from caspec.review.manifest import read_manifest
from caspec.review.server import make_server
from caspec.spec.load import load_spec
from caspec.store import LocalStore

from fakeops import fake_ops

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"
MODEL = {"k": 1}
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
SPEC = """
version: 1
name: gallery
roots:
  cat: {prompt: "a ginger cat", candidates: 2}
edits:
  hats: {from: cat, prompts: ["wearing a red hat", "wearing a blue hat"], candidates: 2}
select:
  pick: {from: hats, count: 2}
"""


def _find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    return "/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None


@pytest.fixture(scope="module")
def chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("browser test skipped: python package `playwright` is not installed (pip install playwright)")
    path = _find_chromium()
    if path is None and not os.environ.get("CASPEC_NO_BROWSER_INSTALL"):
        subprocess.run([str(REPO / "scripts" / "ensure-browser")], timeout=900, check=False)
        path = _find_chromium()
    if path is None:
        pytest.skip("browser test skipped: no `chromium` here and scripts/ensure-browser could not install it "
                    "(needs root/apt and network); install Debian's `chromium` to run it")
    return path


# -- fake ops making real PNGs, so the screenshot shows pictures ---------------------------------
def _png(rgb: tuple[int, int, int], mark: tuple[int, int, int] | None, k: int) -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (64, 64), rgb)
    d = ImageDraw.Draw(img)
    d.ellipse((14, 20, 50, 56), fill=(230, 140, 40))           # the "cat"
    d.polygon([(16, 26), (22, 10), (28, 24)], fill=(230, 140, 40))
    d.polygon([(36, 24), (42, 10), (48, 26)], fill=(230, 140, 40))
    if mark is not None:                                       # the "hat"
        d.rectangle((18 + 2 * k, 2, 46 - 2 * k, 14), fill=mark)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _color(text: str) -> tuple[int, int, int]:
    for name, rgb in (("red", (220, 30, 30)), ("blue", (30, 60, 220)), ("green", (30, 160, 60))):
        if name in text:
            return rgb
    h = hashlib.sha256(text.encode()).digest()
    return (h[0], h[1], h[2])


class PngRoot(Op):
    KIND, VERSION = "root", 1

    def params(self, step, spec):
        return {"prompt": step.prompt, "candidates": step.candidates}

    def run(self, ctx):
        images = []
        for k in range(ctx.params["candidates"]):
            name = f"c{k:03d}.png"
            (ctx.out_dir / name).write_bytes(_png((200 - 40 * k, 220, 240), None, k))
            images.append(image_entry(f"c{k:03d}", name, prompt=ctx.params["prompt"], seed=k))
        return {"images": images}


class PngEdit(Op):
    KIND, VERSION = "edit", 1

    def params(self, step, spec):
        return {"prompts": step.prompts, "candidates": step.candidates}

    def upstream(self, step):
        return {"source": step.from_}

    def run(self, ctx):
        images = []
        for s, src in enumerate(ctx.upstream["source"].result["images"]):
            for p, prompt in enumerate(ctx.params["prompts"]):
                for k in range(ctx.params["candidates"]):
                    name = f"s{s}-p{p}-c{k}.png"
                    (ctx.out_dir / name).write_bytes(_png((200 - 40 * s, 220, 240), _color(prompt), k))
                    images.append(image_entry(name[:-4], name, prompt=prompt, seed=100 + k, source=src["id"],
                                              clip_score=round(0.31 - 0.02 * k + 0.01 * p, 3)))
        return {"images": images}


@pytest.fixture
def gallery(tmp_path):
    with fake_ops(PngRoot(), PngEdit()):
        path = tmp_path / "gallery.yaml"
        path.write_text(textwrap.dedent(SPEC))
        loaded, store = load_spec(path), LocalStore(tmp_path / ".caspec")
        assert run(loaded, store, plan=make_plan(loaded, store, model_identity=MODEL)).exit_code == 3
        server = make_server(loaded, store, port=0, model_identity=MODEL, spec_arg="gallery.yaml")
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield server, loaded, store, tmp_path / "reviews" / "gallery" / "pick.yaml"
        finally:
            server.shutdown()
            server.server_close()


def _kept(manifest: Path) -> list[str]:
    m = read_manifest(manifest)
    assert m is not None
    return sorted(c.id for c in m.kept())


def test_gallery_in_headless_chromium(chromium, gallery):
    from playwright.sync_api import expect, sync_playwright

    server, loaded, store, manifest = gallery
    base = server.base_url
    requests: list[str] = []
    started = time.monotonic()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})

            def guard(route):  # record every request; let only the local server's through
                requests.append(route.request.url)
                if route.request.url.startswith(base + "/"):
                    route.continue_()
                else:
                    route.abort()

            context.route("**/*", guard)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(server.url)  # the URL with the token: it sets the cookie the page's own requests carry

            gate = page.get_by_test_id("gate-pick")
            expect(gate).to_be_visible()
            counter = page.get_by_test_id("counter-pick")
            expect(counter).to_have_text("kept 0 / required 2")
            expect(page.get_by_test_id("status")).to_have_text("1 review step(s), 1 waiting")
            assert page.locator(".card").count() == 8
            assert page.locator(".root img").count() == 4                     # the root beside each group
            expect(page.get_by_test_id("scores-s0-p0-c0")).to_contain_text("clip_score 0.310")
            # (polled from here: the page's CSP forbids eval, which wait_for_function may use)
            all_loaded = "() => Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"
            deadline = time.monotonic() + 20
            while not page.evaluate(all_loaded):
                assert time.monotonic() < deadline, "images did not load"
                time.sleep(0.05)

            # mouse: click two candidates, save
            page.get_by_test_id("card-s0-p1-c0").click()
            page.get_by_test_id("card-s1-p0-c1").click()
            expect(page.get_by_test_id("card-s0-p1-c0")).to_have_attribute("aria-pressed", "true")
            expect(counter).to_have_text("kept 2 / required 2")
            expect(page.get_by_test_id("dirty-pick")).to_have_text("unsaved changes")
            page.get_by_test_id("save-pick").click()
            expect(page.get_by_test_id("message-pick")).to_have_text("saved — re-run caspec run gallery.yaml")
            assert _kept(manifest) == ["s0-p1-c0", "s1-p0-c1"]
            expect(page.get_by_test_id("status")).to_have_text("1 review step(s), 0 waiting")
            assert make_plan(loaded, store, model_identity=MODEL).nodes["pick"].status == "run"
            ARTIFACTS.mkdir(exist_ok=True)
            page.evaluate("window.scrollTo(0, 0)")
            page.screenshot(path=str(ARTIFACTS / "review-gallery.png"), full_page=True)

            # keyboard: focus a card, space keeps it, arrow right moves, space drops that one, `s` saves
            page.get_by_test_id("card-s0-p0-c0").focus()
            page.keyboard.press("Space")
            page.keyboard.press("ArrowRight")
            expect(page.get_by_test_id("card-s0-p0-c1")).to_be_focused()
            page.keyboard.press("ArrowRight")
            expect(page.get_by_test_id("card-s0-p1-c0")).to_be_focused()
            page.keyboard.press("Enter")                                          # drops s0-p1-c0
            expect(counter).to_have_text("kept 2 / required 2")
            page.keyboard.press("s")
            expect(page.get_by_test_id("message-pick")).to_contain_text("saved")
            expect(page.get_by_test_id("dirty-pick")).to_have_text("")
            assert _kept(manifest) == ["s0-p0-c0", "s1-p0-c1"]

            # `a` keeps the whole group of the focused card; counter shows too many; save says so
            page.keyboard.press("ArrowDown")
            page.keyboard.press("a")
            page.keyboard.press("s")
            expect(page.get_by_test_id("message-pick")).to_contain_text("needs exactly 2")
            assert len(_kept(manifest)) > 2
            assert errors == []
        finally:
            browser.close()
    elapsed = time.monotonic() - started
    print(f"browser test: {elapsed:.1f}s in chromium")
    assert requests, "the page made no request at all?"
    foreign = [u for u in requests if not u.startswith(base + "/")]
    assert foreign == [], f"the page tried to reach outside the local server: {foreign}"
    assert (ARTIFACTS / "review-gallery.png").stat().st_size > 10_000


CLIP_SPEC = """
version: 1
name: auto
roots:
  cat: {prompt: "a ginger cat", candidates: 1}
edits:
  hats: {from: cat, prompts: ["wearing a red hat", "wearing a blue hat"], candidates: 2}
select:
  best: {from: hats, by: clip, clip: {min_direction: null, min_relative_direction: null, top_k: 2}}
"""


def test_clip_decisions_shown_and_overruled_in_the_gallery(chromium, tmp_path):
    """A `by: clip` step in the gallery: CLIP's score, pass/fail and keep marks per candidate; a person flips
    them and saves, which writes the manifest as a hand edit would (the step re-runs with that decision), and
    can go back to CLIP's decision."""
    from playwright.sync_api import expect, sync_playwright

    with fake_ops(PngRoot(), PngEdit()):
        path = tmp_path / "auto.yaml"
        path.write_text(textwrap.dedent(CLIP_SPEC))
        loaded, store = load_spec(path), LocalStore(tmp_path / ".caspec")
        assert run(loaded, store, plan=make_plan(loaded, store, model_identity=MODEL)).exit_code == 0
        manifest = tmp_path / "reviews" / "auto" / "best.yaml"
        auto = read_manifest(manifest)
        clip_kept = sorted(c.id for c in auto.kept())
        assert len(clip_kept) == 2
        server = make_server(loaded, store, port=0, model_identity=MODEL, spec_arg="auto.yaml")
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
                try:
                    page = browser.new_page(viewport={"width": 1280, "height": 900})
                    errors: list[str] = []
                    page.on("pageerror", lambda exc: errors.append(str(exc)))
                    page.goto(server.url)
                    expect(page.get_by_test_id("by-best")).to_contain_text("decided by CLIP")
                    for c in auto.candidates:
                        expect(page.get_by_test_id("clip-" + c.id)).to_contain_text(
                            "CLIP kept it" if c.id in clip_kept else "CLIP dropped it")
                    expect(page.get_by_test_id("scores-" + clip_kept[0])).to_contain_text("score")
                    dropped = next(c.id for c in auto.candidates if c.id not in clip_kept)
                    page.get_by_test_id("card-" + clip_kept[0]).click()     # drop one CLIP kept
                    page.get_by_test_id("card-" + dropped).click()          # keep one CLIP dropped
                    page.get_by_test_id("save-best").click()
                    expect(page.get_by_test_id("message-best")).to_contain_text("your decision replaces CLIP's")
                    expect(page.get_by_test_id("by-best")).to_contain_text("a person's decision")
                    assert _kept(manifest) == sorted([clip_kept[1], dropped])
                    node = make_plan(loaded, store, model_identity=MODEL).nodes["best"]
                    assert node.status == "run"  # the person's keep set entered the key
                    page.get_by_test_id("auto-best").click()
                    page.get_by_test_id("save-best").click()
                    expect(page.get_by_test_id("message-best")).to_contain_text("CLIP's own decision again")
                    assert _kept(manifest) == clip_kept
                    assert errors == []
                finally:
                    browser.close()
        finally:
            server.shutdown()
            server.server_close()
