"""The encoder runtime's ONNX Runtime session takes the deployment's threading settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.contract.registry import ModelRegistry
from service.runtime import EncoderRuntime
from tests.service.conftest import MODEL_A, make_settings

SPIN = "session.intra_op.allow_spinning"


@pytest.mark.parametrize(("spin_wait", "entry"), [(False, "0"), (True, "1")])
def test_the_session_spins_only_when_the_settings_say_so(data_dir: Path, spin_wait: bool, entry: str) -> None:
    """Off by default (the server's decoding threads want the cores); ORT's own default on demand."""
    overrides = {} if not spin_wait else {"ort_spin_wait": True}
    settings = make_settings(data_dir, **overrides)
    runtime = EncoderRuntime.load(ModelRegistry(data_dir / "models"), MODEL_A, settings)
    options = runtime.session.get_session_options()
    assert options.get_session_config_entry(SPIN) == entry
    assert options.intra_op_num_threads == settings.ort_intra_op_threads == 1
