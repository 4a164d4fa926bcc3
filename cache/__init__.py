"""The SQLite soft-label store (sqlite-utils). Imports no torch."""

from .store import (
    CLAIMED,
    DEFAULT_DB,
    FAILED,
    OK,
    ImageRow,
    Response,
    Store,
    StoreError,
    default_db_path,
    open_store,
    utc_day,
)

__all__ = [
    "CLAIMED", "DEFAULT_DB", "FAILED", "OK", "ImageRow", "Response", "Store", "StoreError",
    "default_db_path", "open_store", "utc_day",
]
