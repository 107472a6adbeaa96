"""Step kind `export`: write a concept asset in a format other tools load (diffusers, A1111/kohya, bundle).

The formats themselves live in `caspec.assets.export`; `caspec export` runs the same code outside a spec.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ..spec.load import is_asset_path
from .base import Op, RunContext
from .compose import ASSET_FILES, asset_folder


class ExportOp(Op):
    KIND = "export"
    VERSION = 2  # 2: a diffusers export of LoRA beyond the attention projections (e.g. convolutions) keeps peft names
    USES_MODEL = False
    TORCH_COMPUTE = False

    def params(self, step: Any, spec: Any) -> dict[str, Any]:
        name = Path(step.asset).name if is_asset_path(step.asset) else step.asset
        return {"format": step.format, "name": name}

    def inputs(self, step: Any, spec_dir: Path) -> dict[str, Path]:
        if not is_asset_path(step.asset):
            return {}
        return {f"asset/{name}": (spec_dir / step.asset / name).resolve() for name in ASSET_FILES}

    def upstream(self, step: Any) -> dict[str, str]:
        return {} if is_asset_path(step.asset) else {"asset": step.asset}

    def run(self, ctx: RunContext) -> dict[str, Any]:
        from ..assets.export import export_asset
        from ..assets.format import load_asset

        with tempfile.TemporaryDirectory(prefix="caspec-export-") as tmp:
            asset = load_asset(asset_folder(ctx, "asset", Path(tmp)), name=ctx.params["name"])
            files = export_asset(asset, ctx.params["format"], ctx.out_dir)
        return {"format": ctx.params["format"], "files": sorted(str(Path(f).relative_to(ctx.out_dir)) for f in files)}
