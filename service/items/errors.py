"""The item layer's own errors. Only the API layer knows HTTP: service/api/errors.py maps each
class to a status; every error carries a stable snake_case `code` and a message that says
what to do about it."""

from __future__ import annotations


class ItemError(Exception):
    """Base of the item layer's errors."""

    code = "item_error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code


class ItemNotFoundError(ItemError):
    """No item with that id (or its original is gone)."""

    code = "item_not_found"


class ItemExistsError(ItemError):
    """An add without `replace` named ids that exist."""

    code = "item_exists"

    def __init__(self, ids: list[str]) -> None:
        shown = ", ".join(ids[:5])
        super().__init__(f"item id(s) already exist: {shown}; use ?replace=true to overwrite")
        self.ids = ids


class ItemConflictError(ItemError):
    """The request is valid but the state changed under it (retry): the served model swapped,
    or an item has no vector under the served model yet."""

    code = "conflict"


class IndexNotReadyError(ItemError):
    """No model's index is served yet."""

    code = "index_not_ready"


class InvalidItemRequestError(ItemError):
    """Bad ids, metadata, vectors or filters. `field` names the offending field when known."""

    code = "invalid_request"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None) -> None:
        super().__init__(message, code=code)
        self.field = field


class StoreUnavailableError(ItemError):
    """The item store's database cannot be reached (PostgreSQL down or restarting); nothing
    was written. Retry once it is back: the service reconnects by itself."""

    code = "store_unavailable"


class OriginalInCollectionError(ItemError):
    """An original with these bytes is being deleted by a sweep of unreferenced originals
    (on this host or another); write it again and retry once the sweep has finished."""

    code = "original_in_collection"
    retry_after_s = 0.05  # a sweep holds an original for one unlink and one short transaction
