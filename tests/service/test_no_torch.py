"""The serving side never imports torch: a slim API image must stay slim."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.service.conftest import REPO

SCRIPT = """
import asyncio, sys
import service
from service.app import create_app
from service.settings import Settings
app = create_app(Settings(data_dir=sys.argv[1]))

async def run_lifespan():
    async with app.router.lifespan_context(app):
        assert app.state.runtime.active_id == "tiny-a", app.state.runtime.last_error

asyncio.run(run_lifespan())
leaked = sorted(m for m in sys.modules if m == "torch" or m.startswith(("torch.", "torchvision", "trainer")))
print("LEAKED", leaked)
sys.exit(1 if leaked else 0)
"""


def test_import_create_app_and_start_without_torch(data_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(data_dir)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LEAKED []" in proc.stdout
