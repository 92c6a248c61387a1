"""The encoder runtime: verified ONNX models, dynamic micro-batching and hot swap.

* `EncoderRuntime`: one model from the registry (sha256 verified), its card and resize
  policy, and an ONNX Runtime session; `embed(uint8 [N, S, S, 3]) -> float32 [N, D]`.
* `MicroBatcher`: gathers concurrent requests into one ONNX Runtime run of up to
  `batch_max_size` images, waiting at most `batch_max_wait_ms` for a batch to fill; runs
  inference on its own thread so the event loop keeps accepting requests. While one run is
  busy the next batch keeps filling, so under load batches grow on their own.
* `RuntimeManager`: the active model plus any other loaded ones. `activate()` swaps
  atomically: requests already holding a model finish on it; new requests get the new one;
  a replaced model is closed once idle for `retired_model_ttl_s` (search keeps using it
  while items are re-embedded). A background task notices activations written to the
  registry by another process (the worker after training) within `active_poll_s`.

Variants: a model may have an int8 variant beside its fp32 reference. Which one embeds is the
deployment's choice (`Settings.embed_variant`, resolved per model by `variant_for`), the same
in every process that writes vectors. Loaded runtimes are keyed by vector space
(`service.contract.variants.vector_space`): `get` and `embed` take such a key, so the item
layer can keep embedding queries with the variant its served index was built with.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from service.contract.encoder_io import INPUT_NAME, OUTPUT_NAME, ort_session_options
from service.contract.imaging import EncodedImages, ResizePolicy
from service.contract.registry import ModelCard, ModelIntegrityError, ModelRegistry
from service.contract.variants import FP32, serving_variant, split_vector_space, vector_space
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger(__name__)

Listener = Callable[[str], Awaitable[None] | None]


class NoActiveModelError(RuntimeError):
    """No model is active or loadable; the API maps this to 503."""

    code = "no_active_model"

    def __init__(self, detail: str = "") -> None:
        super().__init__(
            "no encoder model is active"
            + (f" ({detail})" if detail else "")
            + ": train one (POST /train-jobs, or `simclr-embed train` then `simclr-embed export`) "
            "or activate a published one (GET /models, POST /models/{id}/activate)"
        )


class ModelLoadError(ModelIntegrityError):
    """The model file passed its checksum but ONNX Runtime or the contract rejects it."""

    code = "model_load_failed"


def default_providers(requested: Sequence[str] = ()) -> list[str]:
    """`requested` when given, else CUDA when this onnxruntime build has it, then CPU."""
    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise ModelLoadError(f"ONNX Runtime providers {missing} are not available here; this build has {available}")
        return list(requested)
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


def open_session(path: str | Path, settings: Settings) -> ort.InferenceSession:
    """An ONNX Runtime session for `path` with the deployment's threads, spinning and providers
    (the encoder's and the classifiers'). Raises ModelLoadError for providers this build lacks;
    ONNX Runtime's own errors pass through."""
    options = ort_session_options(settings.ort_intra_op_threads, settings.ort_inter_op_threads, settings.ort_spin_wait)
    return ort.InferenceSession(str(path), options, providers=default_providers(settings.ort_providers))


def on_cpu(settings: Settings) -> bool:
    """Whether this deployment's ONNX Runtime runs on the CPU (its first provider)."""
    return default_providers(settings.ort_providers)[0] == "CPUExecutionProvider"


def variant_for(card: ModelCard, settings: Settings) -> str:
    """The variant this deployment embeds `card`'s model with (serving_variant of the setting,
    the card's verified variants and the provider): API hosts and workers agree on it."""
    return serving_variant(settings.embed_variant, card.variants, on_cpu(settings))


def space_for(card: ModelCard, settings: Settings) -> str:
    """The vector space this deployment writes `card`'s model's vectors in."""
    return vector_space(card.model_id, variant_for(card, settings))


class EncoderRuntime:
    """One verified encoder: `embed(uint8 [N, S, S, 3]) -> float32 [N, D]` (unit rows)."""

    def __init__(self, card: ModelCard, session: ort.InferenceSession, variant: str = FP32) -> None:
        self.card = card
        self.session = session
        self.model_id = card.model_id
        self.variant = variant
        self.space = vector_space(card.model_id, variant)  # the store key of the vectors it writes
        meta = session.get_modelmeta().custom_metadata_map
        try:
            self.policy = ResizePolicy.from_json(meta.get("resize_policy", card.resize_policy))
        except (ValueError, KeyError) as exc:
            raise ModelLoadError(f"model {card.model_id}: unreadable resize policy: {exc}") from exc
        self.size = self.policy.size
        self.dim = card.embedding_dim
        for key, expected in (
            ("model_id", card.model_id),
            ("input_size", str(card.input_size)),
            ("embedding_dim", str(card.embedding_dim)),
        ):
            if meta.get(key) != expected:
                raise ModelLoadError(
                    f"model {card.model_id}: ONNX metadata {key}={meta.get(key)!r} disagrees with its card ({expected!r}); "
                    "re-export the model"
                )
        inputs, outputs = session.get_inputs(), session.get_outputs()
        if (
            [i.name for i in inputs] != [INPUT_NAME]
            or outputs[0].name != OUTPUT_NAME
            or inputs[0].type != "tensor(uint8)"
        ):
            raise ModelLoadError(
                f"model {card.model_id}: expected input 'images' uint8 [N,S,S,3] and output 'embedding'; "
                f"got {[(i.name, i.type) for i in inputs]} -> {[o.name for o in outputs]}"
            )
        if self.size != card.input_size:
            raise ModelLoadError(
                f"model {card.model_id}: resize policy size {self.size} != input_size {card.input_size}"
            )

    @classmethod
    def load(
        cls, registry: ModelRegistry, model_id: str, settings: Settings, variant: str | None = None
    ) -> EncoderRuntime:
        """Verify `variant`'s file (default: the deployment's, `variant_for`) against its card,
        open a session and warm it up (blocking: call off the loop)."""
        if variant is None:
            variant = variant_for(registry.get(model_id), settings)
        card, path = registry.verify(model_id, variant)  # ModelNotFoundError / ModelIntegrityError
        try:
            session = open_session(path, settings)
        except ModelLoadError:
            raise
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
            raise ModelLoadError(f"ONNX Runtime cannot load model {model_id}: {exc}") from exc
        runtime = cls(card, session, variant)
        runtime.warm_up()
        return runtime

    def warm_up(self) -> None:
        """One run at start so the first request does not pay for allocation and kernel choice."""
        out = self.embed(np.zeros((1, self.size, self.size, 3), dtype=np.uint8))
        if out.shape != (1, self.dim):
            raise ModelLoadError(f"model {self.model_id}: output shape {out.shape}, its card says [N, {self.dim}]")

    def embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> float32 [N, D]."""
        (out,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: images})
        return out

    def preprocess(self, images: Sequence[Image.Image] | EncodedImages) -> np.ndarray:
        """RGB images, or encoded ones decoded one at a time -> uint8 [N, S, S, 3] with this model's resize policy."""
        if isinstance(images, EncodedImages):
            return images.batch(self.policy)
        return self.policy.batch(list(images))


@dataclass
class _Job:
    images: np.ndarray  # uint8 [n, S, S, 3]
    future: asyncio.Future[np.ndarray]


class MicroBatcher:
    """Concurrent `submit()` calls -> batched `runtime.embed` runs on one inference thread."""

    def __init__(self, runtime: EncoderRuntime, *, max_size: int, max_wait_ms: float, metrics: Metrics) -> None:
        self.runtime = runtime
        self.max_size = max_size
        self.max_wait = max_wait_ms / 1000.0
        self.metrics = metrics
        self._pending: deque[_Job] = deque()
        self._pending_images = 0
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"ort-{runtime.model_id}"[:15])
        self._task: asyncio.Task[None] | None = None

    async def submit(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, S, S, 3] -> float32 [N, D]; a request larger than a batch is split."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")
        loop = asyncio.get_running_loop()
        futures = []
        for start in range(0, len(images), self.max_size):
            job = _Job(images[start : start + self.max_size], loop.create_future())
            self._pending.append(job)
            self._pending_images += len(job.images)
            futures.append(job.future)
        self._wakeup.set()
        parts = await asyncio.gather(*futures)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        inflight: asyncio.Future[None] | None = None
        while True:
            while not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
            # Fill the batch until it is full or the oldest request has waited max_wait ...
            deadline = loop.time() + self.max_wait
            while self._pending_images < self.max_size and (remaining := deadline - loop.time()) > 0:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                except TimeoutError:
                    break
            # ... and, while the previous run still occupies the inference thread, keep filling.
            if inflight is not None:
                await inflight
            jobs = [self._pending.popleft()]
            count = len(jobs[0].images)
            while self._pending and count + len(self._pending[0].images) <= self.max_size:
                jobs.append(self._pending.popleft())
                count += len(jobs[-1].images)
            self._pending_images -= count
            inflight = loop.create_task(self._infer(jobs, count))

    async def _infer(self, jobs: list[_Job], count: int) -> None:
        jobs = [j for j in jobs if not j.future.done()]  # a client gone away cancels its future
        if not jobs:
            return
        # [count, S, S, 3] -> [count, D]
        batch = jobs[0].images if len(jobs) == 1 else np.concatenate([j.images for j in jobs])
        start = time.perf_counter()
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._executor, self.runtime.embed, batch)
        except Exception as exc:
            log.exception("inference failed for a batch of %d images on %s", len(batch), self.runtime.model_id)
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        model_id = self.runtime.model_id
        self.metrics.inference_seconds.labels(model_id).observe(time.perf_counter() - start)
        self.metrics.batch_size.labels(model_id).observe(len(batch))
        self.metrics.images_embedded.labels(model_id).inc(len(batch))
        offset = 0
        for job in jobs:
            n = len(job.images)
            if not job.future.done():
                job.future.set_result(out[offset : offset + n])
            offset += n

    async def close(self) -> None:
        """Stop the batching task once nothing is pending; release the thread."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in self._pending:
            if not job.future.done():
                job.future.set_exception(NoActiveModelError("the model was unloaded"))
        self._executor.shutdown(wait=True)


@dataclass
class _Loaded:
    """A loaded model and who is using it."""

    runtime: EncoderRuntime
    batcher: MicroBatcher
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)


class RuntimeManager:
    """Which encoder serves requests; hot swap; listeners told of every activation."""

    def __init__(self, registry: ModelRegistry, settings: Settings, metrics: Metrics) -> None:
        self.registry = registry
        self.settings = settings
        self.metrics = metrics
        self._loaded: dict[str, _Loaded] = {}
        self._active: str | None = None  # the active model id
        self._active_space: str | None = None  # and the vector space it serves: vector_space(id, variant)
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._swap_lock = asyncio.Lock()
        self._listeners: list[Listener] = []
        self._pointer_seen: tuple[int, str | None] | None = None  # (mtime_ns, id) of models/active
        self._failed_pointer: tuple[int, str | None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.last_error: str | None = None

    # -- life cycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the active model (a failure leaves the server up and not ready) and watch the pointer."""
        await self._sync_with_pointer()
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="active-model-watcher")

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for task in list(self._background):
            task.cancel()
        for space in list(self._loaded):
            await self._unload(space)

    # -- reads --------------------------------------------------------------------------------

    @property
    def active_id(self) -> str | None:
        return self._active

    @property
    def active_variant(self) -> str | None:
        return None if self._active_space is None else split_vector_space(self._active_space)[1]

    def get(self, model_id: str | None = None) -> EncoderRuntime:
        """A loaded runtime: the active one by default, else by vector space key (a bare model
        id is its fp32 space). Raises NoActiveModelError when none."""
        key = model_id or self._active_space
        if key is None or key not in self._loaded:
            if model_id is None:
                raise NoActiveModelError(self.last_error or "")
            raise NoActiveModelError(f"model {model_id} is not loaded")
        return self._loaded[key].runtime

    def add_listener(self, callback: Listener) -> None:
        """`callback(model_id)` after every activation (sync, or async: then run as a task)."""
        self._listeners.append(callback)

    # -- embedding ----------------------------------------------------------------------------

    async def embed(
        self, images: Sequence[Image.Image] | EncodedImages | np.ndarray, model_id: str | None = None
    ) -> tuple[str, np.ndarray]:
        """Images (RGB PIL, encoded, or uint8 [N, S, S, 3] already resized) -> (model id, float32 [N, D]).

        `model_id`: a vector space key (vector_space(id, variant); a bare id is fp32), default
        the active model at the deployment's variant. The model is pinned for the whole call, so a swap in between never mixes models:
        the resize policy and the vectors come from the model id returned.
        """
        entry = await self._acquire(model_id)
        try:
            runtime = entry.runtime
            if isinstance(images, np.ndarray):
                if images.dtype != np.uint8 or images.shape[1:] != (runtime.size, runtime.size, 3):
                    raise ValueError(
                        f"expected uint8 [N, {runtime.size}, {runtime.size}, 3], got {images.dtype} {images.shape}"
                    )
                batch = images
            else:
                batch = await asyncio.to_thread(runtime.preprocess, images)  # [N, S, S, 3]
            if len(batch) == 0:
                return runtime.model_id, np.empty((0, runtime.dim), dtype=np.float32)
            vectors = await entry.batcher.submit(batch)  # [N, D]
            return runtime.model_id, vectors
        finally:
            entry.users -= 1
            entry.last_used = time.monotonic()

    async def _acquire(self, space: str | None) -> _Loaded:
        if space is None:
            if self._active_space is None or self._active_space not in self._loaded:
                raise NoActiveModelError(self.last_error or "")
            entry = self._loaded[self._active_space]
        else:
            entry = self._loaded.get(space) or await self._load(space)
        entry.users += 1
        return entry

    async def _deployment_space(self, model_id: str) -> str:
        """The vector space this deployment serves `model_id` in (ModelNotFoundError if absent)."""
        card = await asyncio.to_thread(self.registry.get, model_id)
        return space_for(card, self.settings)

    async def _load(self, space: str) -> _Loaded:
        lock = self._load_locks.setdefault(space, asyncio.Lock())
        async with lock:
            if space in self._loaded:
                return self._loaded[space]
            model_id, variant = split_vector_space(space)
            runtime = await asyncio.to_thread(EncoderRuntime.load, self.registry, model_id, self.settings, variant)
            batcher = MicroBatcher(
                runtime,
                max_size=self.settings.batch_max_size,
                max_wait_ms=self.settings.batch_max_wait_ms,
                metrics=self.metrics,
            )
            entry = self._loaded[space] = _Loaded(runtime, batcher)
            log.info(
                "loaded model %s (%s, %s, dim %d, input %d, providers %s)",
                model_id,
                variant,
                runtime.card.backbone,
                runtime.dim,
                runtime.size,
                runtime.session.get_providers(),
            )
            return entry

    async def _unload(self, space: str) -> None:
        entry = self._loaded.pop(space, None)
        if entry is not None:
            await entry.batcher.close()
            log.info("released model %s", space)

    # -- activation ---------------------------------------------------------------------------

    async def activate(self, model_id: str) -> ModelCard:
        """Load and verify `model_id`, point the registry at it, and swap.

        Raises ModelNotFoundError / ModelIntegrityError (nothing changes) when it cannot load.
        """
        async with self._swap_lock:
            space = await self._deployment_space(model_id)
            entry = await self._acquire(space)  # pinned: not released while the pointer is written
            try:
                await asyncio.to_thread(self.registry.activate, model_id)
                self._pointer_seen = self._read_pointer()
                self._swap(space)
            finally:
                entry.users -= 1
            return entry.runtime.card

    def _swap(self, space: str) -> None:
        model_id, variant = split_vector_space(space)
        previous, self._active, self._active_space = self._active, model_id, space
        self.last_error = None
        card = self._loaded[space].runtime.card
        self.metrics.set_active_model(model_id, card.method, card.backbone, card.embedding_dim, variant)
        if previous != model_id:
            log.info("active model: %s (was %s)", model_id, previous)
            for callback in self._listeners:
                result = callback(model_id)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._background.add(task)
                    task.add_done_callback(self._background.discard)

    def _read_pointer(self) -> tuple[int, str | None]:
        path = self.registry.root / "active"
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            return (0, None)
        return (mtime, self.registry.active())

    async def _sync_with_pointer(self) -> None:
        """Follow models/active when it changed since we last looked (cheap: one stat)."""
        pointer = await asyncio.to_thread(self._read_pointer)
        if pointer == self._pointer_seen or pointer == self._failed_pointer:
            return
        model_id = pointer[1]
        async with self._swap_lock:
            if model_id is None or model_id == self._active:
                self._pointer_seen = pointer
                return
            try:
                space = await self._deployment_space(model_id)
                entry = await self._acquire(space)
            except Exception as exc:  # a broken model must not take the server down
                self._failed_pointer = pointer
                self.last_error = f"model {model_id} could not be loaded: {exc}"
                log.error("%s", self.last_error)
                return
            self._pointer_seen = pointer
            self._swap(space)
            entry.users -= 1

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.active_poll_s)
            try:
                await self._sync_with_pointer()
                await self._release_idle()
            except Exception:
                log.exception("active-model watcher")

    async def _release_idle(self) -> None:
        """Close replaced models nobody used for `retired_model_ttl_s`."""
        now = time.monotonic()
        for space, entry in list(self._loaded.items()):
            if (
                space != self._active_space
                and entry.users == 0
                and now - entry.last_used >= self.settings.retired_model_ttl_s
            ):
                await self._unload(space)
