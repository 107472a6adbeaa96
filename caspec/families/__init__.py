"""Model families, one module each: what differs between SD 1.x, SD 2.x, SDXL and FLUX.1 lives in that family's module.

* :func:`get` gives the :class:`~caspec.families.base.Family` of a name (``sd1``, ``sd2``, ``sdxl``, ``flux``), a
  pipe or an asset (anything with a ``family`` attribute);
* :func:`folder_family` reads a diffusers folder's family from its configs (pure: no weights, no torch), and
  refuses layouts caspec does not run (SD 3.x, FLUX.2, FLUX.3, Chroma, Qwen-Image, the SDXL refiner), naming them;
* :func:`embedded_family` gives the family of an embedded model (``tiny``, ``toy``, ``tiny-xl``, ``tiny-v``,
  ``tiny-flux``, ``tiny-flux-schnell``).

Adding a family is one module with a :class:`~caspec.families.base.Family` subclass, listed in
:data:`DETECTION_ORDER`, plus its tests.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ModelError
from .base import Family, UNetFamily, read_json
from .flux import FLUX
from .sd1 import SD1
from .sd2 import SD2
from .sdxl import SDXL

FAMILIES: dict[str, Family] = {f.name: f for f in (SD1, SD2, SDXL, FLUX)}
DETECTION_ORDER: tuple[Family, ...] = (FLUX, SDXL, SD2, SD1)
"""The order in which families are asked whether a folder is theirs (SD 1.x takes what is left)."""
SUPPORTED = ("SD 1.x, SD 2.x, SDXL and FLUX.1 models (diffusers layout: unet/ or FLUX.1's transformer/, vae/, "
             "text_encoder/, tokenizer/)")
TINY_FILE = "caspec-tiny.json"  # an embedded model's identity file, which names its family

# families caspec does not run yet: a pipeline (or transformer) class-name fragment -> what to call it
UNSUPPORTED_CLASSES = {"StableDiffusion3": "SD 3.x", "SD3": "SD 3.x", "Flux2": "FLUX.2", "Flux3": "FLUX.3",
                       "Chroma": "Chroma", "QwenImage": "Qwen-Image"}


def get(family: Any) -> Family:
    """The family named ``family`` (a name, or anything with a ``family`` attribute: a pipe, an asset)."""
    name = getattr(family, "family", family) or "sd1"
    try:
        return FAMILIES[str(name)]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}: caspec knows {', '.join(FAMILIES)}") from None


def describe(family: Any) -> str:
    """A family's title (``SD 1.x``); an unknown name as it is."""
    name = getattr(family, "family", family)
    return FAMILIES[name].title if name in FAMILIES else str(name or "unknown")


def _refuse_unsupported(folder: Path, index: dict[str, Any]) -> None:
    """Families caspec does not run yet, named by their pipeline or transformer class."""
    for cls in (str(index.get("_class_name", "")),
                str(read_json(folder / "transformer" / "config.json").get("_class_name", ""))):
        for fragment, title in UNSUPPORTED_CLASSES.items():
            if fragment in cls:
                raise ModelError(f"{folder} holds a model of the {title} family ({cls}), which is not supported "
                                 f"yet; caspec runs {SUPPORTED}",
                                 hint="use an SD 1.x, SD 2.x, SDXL or FLUX.1 base model")


def _refuse_other_layouts(folder: Path, index: dict[str, Any]) -> None:
    """Layouts no family claims: an unknown transformer, the SDXL refiner."""
    cls = str(index.get("_class_name", ""))
    if (folder / "transformer").is_dir():
        raise ModelError(f"{folder} holds a {cls or 'transformer-based'} model (a `transformer/`, not a `unet/`): "
                         f"that family is not supported yet; caspec runs {SUPPORTED}",
                         hint="use an SD 1.x, SD 2.x, SDXL or FLUX.1 base model")
    if "Refiner" in cls or (index.get("requires_aesthetics_score") is True):
        raise ModelError(f"{folder} is an SDXL refiner ({cls}): caspec trains and samples with base models",
                         hint="use the SDXL base model (e.g. stabilityai/stable-diffusion-xl-base-1.0)")
    if ((folder / "text_encoder_2").is_dir() or "text_encoder_2" in index) and not (folder / "text_encoder").is_dir():
        raise ModelError(f"{folder} has `text_encoder_2/` but no `text_encoder/` (an SDXL refiner layout)",
                         hint="use the SDXL base model, which has both text encoders")


def folder_family(folder: Path) -> str:
    """The family name of a diffusers model folder, or a :class:`ModelError` naming what was found."""
    folder = Path(folder)
    tiny = read_json(folder / TINY_FILE)
    if tiny.get("family") in FAMILIES:
        return str(tiny["family"])
    index = read_json(folder / "model_index.json")
    _refuse_unsupported(folder, index)
    for family in DETECTION_ORDER:
        if isinstance(family, UNetFamily):
            _refuse_other_layouts(folder, index)
        if family.claims(folder, index):
            return family.name
    raise ModelError(f"{folder}: no model family fits this folder", hint=f"caspec runs {SUPPORTED}")


def embedded_family(name: str) -> str:
    """The family of an embedded model (``tiny``, ``toy``, ``tiny-xl``, ``tiny-v``, ``tiny-flux``, ...)."""
    from ..models.tiny import TINY_MODELS
    from ..models.tiny_flux import FAMILY, TINY_FLUX_MODELS

    if name in TINY_FLUX_MODELS:
        return FAMILY
    return TINY_MODELS[name].family if name in TINY_MODELS else "sd1"


__all__ = ["Family", "FAMILIES", "DETECTION_ORDER", "SUPPORTED", "get", "describe", "folder_family",
           "embedded_family"]
