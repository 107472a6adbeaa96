"""The paper's CLIP metrics (section 4.1): prompt consistency and identity consistency, and Fig. 5; and the
edit score of automatic selection (directional similarity, :mod:`caspec.metrics.edit_score`).

Cheap to import: torch and open_clip are imported when a CLIP model is first loaded.
"""
from .clip import (
    INIT_SEED,
    RANDOM,
    TINY_CLIP,
    Clip,
    ClipSpec,
    ClipWeightsError,
    check_weights,
    clear_clip_cache,
    clip_identity,
    load_clip,
    register_configs,
)
from .edit_score import EditScore, directional_similarity, score_candidate
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
    "ClipSpec", "Clip", "ClipWeightsError", "load_clip", "check_weights", "clear_clip_cache", "clip_identity",
    "register_configs", "TINY_CLIP", "INIT_SEED", "RANDOM", "EditScore", "score_candidate", "directional_similarity", "METRICS", "prompt_consistency", "identity_consistency", "plain_prompt", "evaluate",
    "save_result", "plot", "check_thresholds",
]
