"""The paper's CLIP metrics (section 4.1): prompt consistency and identity consistency, and Fig. 5.

Cheap to import: torch and open_clip are imported when a CLIP model is first loaded.
"""
from .clip import INIT_SEED, TINY_CLIP, Clip, ClipSpec, clear_clip_cache, clip_identity, load_clip, register_configs
from .evaluate import (
    METRICS,
    check_thresholds,
    evaluate,
    identity_consistency,
    plain_prompt,
    plot,
    prompt_consistency,
    save_result,
)

__all__ = [
    "ClipSpec", "Clip", "load_clip", "clear_clip_cache", "clip_identity", "register_configs", "TINY_CLIP",
    "INIT_SEED", "METRICS", "prompt_consistency", "identity_consistency", "plain_prompt", "evaluate",
    "save_result", "plot", "check_thresholds",
]
