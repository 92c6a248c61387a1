"""Image-aware string formats for schemathesis: `format: binary` (multipart files) and
`format: byte` (base64 in JSON) draw real small images as often as random bytes, so fuzzed
requests reach the encoder and the index, not only the decoder's error path.

Imported by tests/hardening/test_fuzz_schema.py, and loaded by the schemathesis CLI in
bench/fuzz_long.py through `SCHEMATHESIS_HOOKS=tests.hardening.fuzz_formats`.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image


def sample_images() -> list[bytes]:
    """A few small real encodings (PNG, JPEG, GIF, WebP; 8 to 64 px) of noise."""
    rng = np.random.default_rng(7)
    out = []
    for fmt, size in (("PNG", 8), ("JPEG", 33), ("GIF", 16), ("WEBP", 40), ("PNG", 64)):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


IMAGES = sample_images()
IMAGE_BYTES = st.one_of(st.sampled_from(IMAGES), st.binary(max_size=256))

schemathesis.openapi.format("binary", IMAGE_BYTES)
schemathesis.openapi.format("byte", IMAGE_BYTES.map(lambda b: base64.b64encode(b).decode()))
