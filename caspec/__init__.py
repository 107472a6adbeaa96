"""caspec: turn a YAML spec into Concept Assets through a cached DAG of steps.

Public API: :func:`load_spec` (load), :func:`make_plan` (plan), :func:`run` (execute).
"""
__version__ = "0.1.0"


def __getattr__(name):  # lazy: importing caspec must not import torch
    if name == "load_spec":
        from .spec.load import load_spec
        return load_spec
    if name == "make_plan":
        from .plan.graph import make_plan
        return make_plan
    if name == "run":
        from .exec.runner import run
        return run
    raise AttributeError(name)
