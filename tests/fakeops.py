"""Fast stand-in ops for executor tests: same contract as the real ones, no model."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager

import caspec.ops as ops
from caspec.ops.base import Op, image_entry


class FakeRoot(Op):
    KIND, VERSION = "root", 1

    def params(self, step, spec):
        return {"prompt": step.prompt, "candidates": step.candidates}

    def run(self, ctx):
        log = os.environ.get("FAKE_LOG")
        if log:
            with open(log, "a") as f:
                f.write(f"run {ctx.step_id}\n")
        if os.environ.get("FAKE_SLEEP"):
            time.sleep(float(os.environ["FAKE_SLEEP"]))
        if ctx.params["prompt"] == "crash":
            (ctx.out_dir / "c000.png").write_bytes(b"half")
            raise RuntimeError("boom")
        if ctx.params["prompt"] == "interrupt":
            (ctx.out_dir / "c000.png").write_bytes(b"half")
            raise KeyboardInterrupt
        images = []
        for k in range(ctx.params["candidates"]):
            name = f"c{k:03d}.png"
            (ctx.out_dir / name).write_bytes(f"{ctx.params['prompt']}#{k}".encode())
            images.append(image_entry(f"c{k:03d}", name, prompt=ctx.params["prompt"], seed=k))
        return {"images": images}


class FakeEdit(Op):
    KIND, VERSION = "edit", 1

    def params(self, step, spec):
        return {"prompts": step.prompts, "candidates": step.candidates}

    def upstream(self, step):
        return {"source": step.from_}

    def run(self, ctx):
        images = []
        for s, src in enumerate(ctx.upstream["source"].result["images"]):
            data = ctx.upstream["source"].file(src["file"]).read_bytes()
            for p, prompt in enumerate(ctx.params["prompts"]):
                for k in range(ctx.params["candidates"]):
                    name = f"s{s}-p{p}-c{k}.png"
                    (ctx.out_dir / name).write_bytes(data + f"|{prompt}#{k}".encode())
                    images.append(image_entry(name[:-4], name, prompt=prompt, seed=k, source=src["id"]))
        return {"images": images}


class NoisyRoot(FakeRoot):
    """Like FakeRoot, but every run writes other bytes (as CUDA sampling may): a fresh nonce per image."""

    def run(self, ctx):
        result = super().run(ctx)
        for img in result["images"]:
            path = ctx.out_dir / img["file"]
            path.write_bytes(path.read_bytes() + b"~" + os.urandom(8).hex().encode())
        return result


@contextmanager
def fake_ops(root=None, edit=None):
    """Install fake `root`/`edit` ops (defaults: FakeRoot/FakeEdit) for the duration of the block."""
    saved = dict(ops._cache)
    ops._cache["root"] = root or FakeRoot()
    ops._cache["edit"] = edit or FakeEdit()
    try:
        yield
    finally:
        ops._cache.clear()
        ops._cache.update(saved)
