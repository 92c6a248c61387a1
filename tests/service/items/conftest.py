"""The item-layer and API item tests run on both store backends (tests/service/backends.py)."""

from tests.service.backends import client, store, store_url

__all__ = ["client", "store", "store_url"]  # fixtures: the item tests' `client` runs on the test's backend
