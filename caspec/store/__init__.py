"""The content-addressed store that caches every step's outputs (see :mod:`caspec.store.local`).

``open_store(path)`` gives a :class:`LocalStore` for a directory and a
:class:`caspec.store.remote.RemoteStore` for an fsspec URL (``s3://bucket/prefix``; imported only then);
the interface both implement is :class:`caspec.store.base.Store`.
"""
from .base import GcReport, Record, Store
from .local import CorruptRecordWarning, LocalStore, default_root, open_store

__all__ = ["LocalStore", "Record", "GcReport", "Store", "CorruptRecordWarning", "open_store", "default_root"]
