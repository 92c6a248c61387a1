"""ModelRegistry: atomic publish and activate, integrity on load, id validation, listing."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from service.contract import atomic
from service.contract.registry import (
    METADATA_KEYS,
    ModelCard,
    ModelIntegrityError,
    ModelNotFoundError,
    ModelRegistry,
    RegistryError,
    VariantCard,
    sha256_file,
)

# Every file-system step a publish (with activation) takes; each one in turn is made to fail.
STEPS = [
    (shutil, "copyfile"),
    (os, "fsync"),
    (os, "fchmod"),
    (os, "chmod"),
    (os, "rename"),
    (os, "replace"),
    (atomic, "write_atomic"),
    (atomic, "fsync_dir"),
]


class Interrupted(Exception):
    pass


def _instrument(monkeypatch: pytest.MonkeyPatch, fail_at: int | None, on_fail) -> list[str]:
    """Wrap every step in STEPS with one shared counter; the `fail_at`-th call runs on_fail()."""
    calls: list[str] = []
    for owner, name in STEPS:
        original = getattr(owner, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            if len(calls) == fail_at:
                on_fail()
            return _original(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapped)
    return calls


def _raise() -> None:
    raise Interrupted


def _seeded(registry: ModelRegistry, make_card, model_file: Path) -> None:
    registry.publish(model_file, make_card("old", "2024-01-01T00:00:00Z"), activate=True)


def _publish_steps(tmp_path: Path, make_card, model_file: Path) -> list[str]:
    registry = ModelRegistry(tmp_path / "count")
    _seeded(registry, make_card, model_file)
    with pytest.MonkeyPatch.context() as mp:
        calls = _instrument(mp, None, _raise)
        registry.publish(model_file, make_card("new"), activate=True)
    return calls


def _assert_consistent(registry: ModelRegistry, published: bool) -> None:
    """Only complete models listed, each verifiable; active is a complete model."""
    ids = [c.model_id for c in registry.list()]
    assert ids == (["new", "old"] if published else ["old"])
    for model_id in ids:
        registry.verify(model_id)
    assert registry.active() in ids
    if not published:
        assert registry.active() == "old"
    assert sorted(p.name for p in registry.root.iterdir()) == sorted([*ids, "active", ".staging"])


def test_publish_steps_are_known(tmp_path, make_card, model_file):
    calls = _publish_steps(tmp_path, make_card, model_file)
    assert {"copyfile", "rename", "replace", "write_atomic", "fsync_dir"} <= set(calls)
    assert len(calls) >= 10


def test_publish_interrupted_at_every_step(tmp_path, make_card, model_file, monkeypatch):
    """An exception at any step: nothing half-visible, active unchanged unless the pointer
    was already replaced, staging left clean."""
    steps = _publish_steps(tmp_path, make_card, model_file)
    rename_at = steps.index("rename") + 1
    for i, step in enumerate(steps, start=1):
        registry = ModelRegistry(tmp_path / f"raise{i}")
        _seeded(registry, make_card, model_file)
        with pytest.MonkeyPatch.context() as mp:
            _instrument(mp, i, _raise)
            with pytest.raises(Interrupted):
                registry.publish(model_file, make_card("new"), activate=True)
        _assert_consistent(registry, published=i > rename_at)
        assert list((registry.root / ".staging").iterdir()) == [], f"step {i} ({step}) left staging behind"
        if i <= rename_at:  # a retry after the failure succeeds
            registry.publish(model_file, make_card("new"), activate=True)
            assert registry.active() == "new"


def _child(root: Path, model_file: Path, card: ModelCard, fail_at: int) -> None:
    """A process killed at step `fail_at` of a publish: no except or finally runs."""
    mp = pytest.MonkeyPatch()
    _instrument(mp, fail_at, lambda: os._exit(17))
    ModelRegistry(root).publish(model_file, card, activate=True)
    os._exit(0)


def test_publish_killed_at_every_step(tmp_path, make_card, model_file):
    """A process killed half-way (os._exit: no cleanup) leaves only complete models and the
    old pointer; sweep_staging removes what it left."""
    steps = _publish_steps(tmp_path, make_card, model_file)
    rename_at = steps.index("rename") + 1
    ctx = multiprocessing.get_context("fork")
    for i in range(1, len(steps) + 1):
        registry = ModelRegistry(tmp_path / f"kill{i}")
        _seeded(registry, make_card, model_file)
        proc = ctx.Process(target=_child, args=(registry.root, model_file, make_card("new"), i))
        proc.start()
        proc.join(30)
        assert proc.exitcode == 17
        _assert_consistent(registry, published=i > rename_at)
        left = list((registry.root / ".staging").iterdir())
        assert registry.sweep_staging() == len(left)
        assert list((registry.root / ".staging").iterdir()) == []
        # the stage dir exists from before the first step until the rename
        assert any(p.name.startswith("new.") for p in left) == (i <= rename_at)


def test_activation_failure_keeps_old_pointer(registry, make_card, model_file, monkeypatch):
    _seeded(registry, make_card, model_file)

    original = atomic.write_atomic

    def fail_on_pointer(path, data, **kwargs):
        if path.name == "active":
            raise OSError("disk full")
        return original(path, data, **kwargs)

    monkeypatch.setattr(atomic, "write_atomic", fail_on_pointer)
    with pytest.raises(OSError, match="disk full"):
        registry.publish(model_file, make_card("new"), activate=True)
    monkeypatch.undo()
    assert registry.active() == "old"
    assert [c.model_id for c in registry.list()] == ["new", "old"]  # complete, just not active


def test_verify_refuses_tampered_model(registry, make_card, model_file):
    card = registry.publish(model_file, make_card("m1"))
    assert registry.verify("m1") == (card, registry.root / "m1" / "model.onnx")
    path = registry.root / "m1" / "model.onnx"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=r"sha256 .* its card says .* re-publish") as err:
        registry.verify("m1")
    assert err.value.code == "model_integrity_error"
    path.unlink()
    with pytest.raises(ModelIntegrityError, match="no model.onnx"):
        registry.verify("m1")
    with pytest.raises(ModelNotFoundError) as missing:
        registry.verify("nope")
    assert missing.value.code == "model_not_found" and "nope" in str(missing.value)


def test_verify_refuses_card_with_other_hash(registry, make_card, model_file):
    card = registry.publish(model_file, make_card("m1"))
    assert card.sha256 == sha256_file(model_file) and card.size_bytes == model_file.stat().st_size
    (registry.root / "m1" / "card.json").write_text(card.model_copy(update={"sha256": "0" * 64}).model_dump_json())
    with pytest.raises(ModelIntegrityError, match="sha256"):
        registry.verify("m1")


def test_activate_is_atomic_under_concurrent_reads(registry, make_card, model_file):
    for model_id in ("alpha", "beta-model-with-a-longer-id"):
        registry.publish(model_file, make_card(model_id))
    ids = {"alpha", "beta-model-with-a-longer-id"}
    registry.activate("alpha")
    seen: set[object] = set()
    raw: set[str] = set()
    stop = threading.Event()

    def reader() -> None:
        other = ModelRegistry(registry.root)
        while not stop.is_set():
            seen.add(other.active())
            raw.add((registry.root / "active").read_text())

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        for i in range(150):
            registry.activate("alpha" if i % 2 else "beta-model-with-a-longer-id")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert seen == ids  # never None, never a partial id
    assert raw == {f"{i}\n" for i in ids}


@pytest.mark.parametrize(
    "bad_id", ["../x", "..", ".", "a/b", "/abs", ".hidden", "", "a b", "x" * 129, "active", "a\x00b", "ü", "abc\n"]
)
def test_invalid_model_ids_refused(registry, make_card, model_file, bad_id):
    before = sorted(p.name for p in registry.root.parent.iterdir())
    with pytest.raises(RegistryError, match="invalid model id"):
        registry.publish(model_file, make_card("ok").model_copy(update={"model_id": bad_id}))
    assert sorted(p.name for p in registry.root.parent.iterdir()) == before
    assert registry.list() == [] and list(registry.root.iterdir()) in ([], [registry.root / ".staging"])
    with pytest.raises(ModelNotFoundError):
        registry.get(bad_id)
    with pytest.raises(ModelNotFoundError):
        registry.activate(bad_id)


def test_model_ids_never_reused(registry, make_card, model_file):
    registry.publish(model_file, make_card("m1"))
    with pytest.raises(RegistryError, match="already published"):
        registry.publish(model_file, make_card("m1"))


def test_concurrent_publish_of_same_id(registry, make_card, model_file, monkeypatch):
    """Another process wins the rename: this publish fails cleanly, the winner is untouched."""
    winner = registry.publish(model_file, make_card("m1"))
    (registry.root / "m1").rename(registry.root / "hold")
    original = os.rename

    def racing_rename(src, dst):
        original(registry.root / "hold", registry.root / "m1")  # the other publisher lands first
        return original(src, dst)

    monkeypatch.setattr(os, "rename", racing_rename)
    with pytest.raises(RegistryError, match="published concurrently"):
        registry.publish(model_file, make_card("m1", metrics={"other": 1.0}))
    monkeypatch.undo()
    assert registry.verify("m1")[0] == winner
    assert list((registry.root / ".staging").iterdir()) == []


def test_list_ignores_staging_and_broken_dirs(registry, make_card, model_file):
    registry.publish(model_file, make_card("b-older", "2025-01-01T00:00:00Z"))
    registry.publish(model_file, make_card("a-newer", "2025-06-01T00:00:00Z"))
    root = registry.root
    (root / ".staging" / "half.x1").mkdir(parents=True)
    shutil.copy(root / "a-newer" / "card.json", root / ".staging" / "half.x1" / "card.json")
    (root / "no-card").mkdir()
    (root / "no-card" / "model.onnx").write_bytes(b"x")
    (root / "no-model").mkdir()
    (root / "no-model" / "card.json").write_text(make_card("no-model").model_dump_json())
    (root / "bad-json").mkdir()
    (root / "bad-json" / "model.onnx").write_bytes(b"x")
    (root / "bad-json" / "card.json").write_text('{"model_id": "bad-json", ')
    shutil.copytree(root / "a-newer", root / "copied")  # card names another model
    (root / "stray-file").write_text("x")
    registry.activate("a-newer")
    assert [c.model_id for c in registry.list()] == ["a-newer", "b-older"]
    with pytest.raises(ModelIntegrityError, match="names model 'a-newer'"):
        registry.get("copied")
    with pytest.raises(ModelIntegrityError, match="unreadable"):
        registry.get("bad-json")
    with pytest.raises(ModelIntegrityError, match="no model.onnx"):
        registry.activate("no-model")
    assert registry.active() == "a-newer"


def test_active_pointer_garbage_reads_as_none(registry):
    assert registry.active() is None
    for content in ("", "\n", "../etc", "\xff"):
        (registry.root / "active").write_text(content, errors="surrogateescape")
        assert registry.active() is None


def test_published_files_readable_by_other_users(registry, make_card, model_file):
    registry.publish(model_file, make_card("m1"), activate=True)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)
    assert mode(registry.root / "m1") == 0o755
    assert mode(registry.root / "m1" / "model.onnx") == 0o644
    assert mode(registry.root / "m1" / "card.json") == 0o644
    assert mode(registry.root / "active") == 0o644


def test_sweep_staging_spares_a_publish_in_progress(registry):
    staging = registry.root / ".staging"
    (staging / "old.abc").mkdir(parents=True)
    (staging / "old.abc" / "model.onnx").write_bytes(b"x")
    (staging / "fresh.def").mkdir()
    past = time.time() - 7200
    os.utime(staging / "old.abc", (past, past))
    assert registry.sweep_staging(min_age_s=3600) == 1
    assert [p.name for p in staging.iterdir()] == ["fresh.def"]
    assert registry.sweep_staging() == 1 and list(staging.iterdir()) == []
    assert registry.sweep_staging() == 0


def test_card_survives_onnx_metadata(tmp_path, registry, make_card):
    """The card written into a real ONNX model's metadata_props reads back equal."""
    node = helper.make_node("Identity", ["images"], ["embedding"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [None, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    card = make_card("m1", metrics={"knn_top1": 0.123456789, "linear_top1": 0.5})
    helper.set_model_props(model, card.onnx_metadata())
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    published = registry.publish(path, card)
    props = {p.key: p.value for p in onnx.load(str(registry.root / "m1" / "model.onnx")).metadata_props}
    assert set(props) == set(METADATA_KEYS)
    assert all(isinstance(v, str) for v in props.values())
    assert ModelCard.from_onnx_metadata(props, sha256=published.sha256, size_bytes=published.size_bytes) == published
    assert ModelCard.from_onnx_metadata(props) == card
    with pytest.raises(ModelIntegrityError, match="lacks dataset_fingerprint"):
        ModelCard.from_onnx_metadata({k: v for k, v in props.items() if k != "dataset_fingerprint"})
    with pytest.raises(ModelIntegrityError, match="malformed"):
        ModelCard.from_onnx_metadata({**props, "train_config": "{not json"})
    with pytest.raises(ModelIntegrityError, match="malformed"):
        ModelCard.from_onnx_metadata({**props, "input_size": "thirty-two"})


def _variant_file(tmp_path: Path) -> Path:
    path = tmp_path / "src" / "model.int8.onnx"
    path.write_bytes(b"int8 stand-in " * 1000)
    return path


def test_variants_publish_with_the_model_and_are_verified(registry, make_card, model_file, tmp_path):
    variant = VariantCard(file="model.int8.onnx", providers=["CPUExecutionProvider"], verification={"cosine_min": 0.99})
    card = registry.publish(
        model_file, make_card("m", variants={"int8": variant}), variants={"int8": _variant_file(tmp_path)}
    )
    assert card.variants["int8"].sha256 == sha256_file(registry.root / "m" / "model.int8.onnx")
    assert card.variants["int8"].size_bytes == 14_000 and card.variants["int8"].verification == {"cosine_min": 0.99}
    assert registry.get("m") == card
    assert registry.verify("m", "int8") == (card, registry.root / "m" / "model.int8.onnx")
    assert registry.verify("m")[1] == registry.root / "m" / "model.onnx"
    (registry.root / "m" / "model.int8.onnx").write_bytes(b"tampered")
    with pytest.raises(ModelIntegrityError, match="model.int8.onnx has sha256"):
        registry.verify("m", "int8")
    registry.verify("m")  # the reference is unaffected


def test_variant_files_must_match_the_card(registry, make_card, model_file, tmp_path):
    variant = VariantCard(file="model.int8.onnx")
    with pytest.raises(RegistryError, match="lists variants"):
        registry.publish(model_file, make_card("a", variants={"int8": variant}))  # no file given
    with pytest.raises(RegistryError, match="lists variants"):
        registry.publish(model_file, make_card("b"), variants={"int8": _variant_file(tmp_path)})
    for name, file in (("fp32", "model.fp32.onnx"), ("../x", "model.../x.onnx"), ("int8", "../model.onnx")):
        with pytest.raises(RegistryError, match="invalid variant"):
            registry.publish(
                model_file, make_card("c", variants={name: VariantCard(file=file)}), variants={name: model_file}
            )
    assert registry.list() == []
    assert not registry._staging.exists() or not any(registry._staging.iterdir())


def test_a_card_written_before_variants_loads_as_fp32_only(registry, make_card, model_file):
    card = registry.publish(model_file, make_card("old"))
    legacy = {k: v for k, v in card.model_dump().items() if k not in ("variants", "refused_variants")}
    (registry.root / "old" / "card.json").write_text(json.dumps(legacy))
    loaded = registry.get("old")
    assert loaded.variants == {} and loaded.refused_variants == {}
    registry.verify("old")
    with pytest.raises(ModelNotFoundError, match="has no int8 variant"):
        registry.verify("old", "int8")
