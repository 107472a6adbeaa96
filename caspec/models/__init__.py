"""Building and loading diffusion pipelines (tiny, local folders, hub ids) and model identity."""


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' own progress bars and info logs: caspec reports progress itself."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    try:
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog
    except ImportError:  # pragma: no cover
        return
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    tlog.set_verbosity_error()
    tlog.disable_progress_bar()
