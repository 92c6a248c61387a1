"""MoCo v2: InfoNCE logits and loss against a float64 loop, the key queue, the momentum encoder."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from service.contract.ports import free_port
from service.contract.train_config import TrainConfig
from trainer import distributed
from trainer.checkpoint import checkpoint_path, load_checkpoint, load_encoder
from trainer.engine import train
from trainer.losses.info_nce import info_nce_logits, info_nce_loss
from trainer.methods import build_method
from trainer.methods.moco import KeyQueue, MoCoV2
from trainer.models import Encoder
from trainer.optim import build_optimizer


def _loop_logits(q: np.ndarray, k: np.ndarray, queue: np.ndarray, t: float) -> np.ndarray:
    """Plain float64 loop: row i = [q_i.k_i, q_i.queue_0, ...] / t on normalised q, k."""
    n, d = q.shape
    out = np.zeros((n, 1 + len(queue)))
    for i in range(n):
        qn = q[i] / math.sqrt(sum(v * v for v in q[i]))
        kn = k[i] / math.sqrt(sum(v * v for v in k[i]))
        out[i, 0] = sum(qn[c] * kn[c] for c in range(d)) / t
        for j in range(len(queue)):
            out[i, 1 + j] = sum(qn[c] * queue[j, c] for c in range(d)) / t
    return out


def _loop_loss(logits: np.ndarray) -> float:
    total = 0.0
    for row in logits:
        m = max(row)
        total += -(row[0] - m - math.log(sum(math.exp(v - m) for v in row)))
    return total / len(logits)


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _inputs(source: str, photos: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    if source == "random":
        q, k, queue = rng.normal(size=(6, 5)), rng.normal(size=(6, 5)), rng.normal(size=(11, 5))
    else:  # real images: pixel vectors of photo patches, two crops of the same image as q and k
        img = photos.astype(np.float64) / 255.0 - 0.5  # [256, 32, 32, 3]
        q = img[:6, :16, :16].reshape(6, -1)
        k = img[:6, 8:24, 8:24].reshape(6, -1)
        queue = img[100:113, 4:20, 4:20].reshape(13, -1)
    return q, k, _unit_rows(queue)


@pytest.mark.parametrize("source", ["random", "photos"])
@pytest.mark.parametrize("temperature", [0.07, 0.2, 1.0])
def test_info_nce_matches_float64_loop(source: str, temperature: float, request: pytest.FixtureRequest) -> None:
    photos = request.getfixturevalue("photos") if source == "photos" else None
    q, k, queue = _inputs(source, photos)
    expected_logits = _loop_logits(q, k, queue, temperature)
    as_t = lambda a: torch.from_numpy(a)
    logits = info_nce_logits(as_t(q), as_t(k), as_t(queue), temperature)
    assert logits.shape == (len(q), 1 + len(queue))
    np.testing.assert_allclose(logits.numpy(), expected_logits, rtol=1e-12, atol=1e-12)
    loss = info_nce_loss(as_t(q), as_t(k), as_t(queue), temperature)
    assert loss.item() == pytest.approx(_loop_loss(expected_logits), rel=1e-6)  # CE runs in float32


def test_info_nce_gradient_reaches_query_only() -> None:
    torch.manual_seed(0)
    q = torch.randn(4, 8, requires_grad=True)
    k = torch.randn(4, 8, requires_grad=True)
    queue = torch.nn.functional.normalize(torch.randn(16, 8), dim=1).requires_grad_(True)
    info_nce_loss(q, k.detach(), queue, 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None and queue.grad is None


# --- the key queue ---------------------------------------------------------------------


def test_queue_enqueue_order_wraps_and_keeps_size() -> None:
    queue = KeyQueue(size=6, dim=2)
    assert queue.keys.shape == (6, 2) and int(queue.ptr) == 0
    torch.testing.assert_close(queue.keys.norm(dim=1), torch.ones(6))  # random unit keys at start
    rows = lambda a, b: torch.arange(a, b, dtype=torch.float32)[:, None].repeat(1, 2)
    expected = queue.keys.clone()
    # A plain list model of a FIFO of 6 slots written in order, oldest overwritten.
    for start, n in [(0, 4), (4, 4), (8, 3), (11, 6), (17, 9)]:
        batch = rows(start, start + n)
        ptr = int(queue.ptr)
        for i in range(n):
            expected[(ptr + i) % 6] = batch[i]
        queue.enqueue(batch)
        assert torch.equal(queue.keys, expected), (start, n)
        assert int(queue.ptr) == (ptr + n) % 6
        assert queue.keys.shape == (6, 2)
    # After 26 keys in all, the queue holds exactly the newest 6: 20..25.
    assert sorted(queue.keys[:, 0].tolist()) == list(range(20, 26))


def test_queue_is_state_not_parameters() -> None:
    queue = KeyQueue(size=8, dim=3)
    assert list(queue.parameters()) == []
    assert set(queue.state_dict()) == {"keys", "ptr"}  # checkpointed with the method


# --- the method: wiring, no gradient into the key side, the momentum update -------------

N, S = 8, 16


def _tiny(symmetric: bool = True, **kw: object) -> MoCoV2:
    cfg = TrainConfig(
        method="moco_v2", batch_size=N, queue_size=40, image_size=S, small_stem=False,
        proj_hidden_dim=32, proj_out_dim=16, optimizer="sgd", base_lr=0.5, weight_decay=1e-4, **kw,
    )  # fmt: skip
    torch.manual_seed(0)
    return MoCoV2(cfg, symmetric=symmetric)


def _views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, 3, S, S, generator=g), torch.randn(N, 3, S, S, generator=g)


@pytest.mark.parametrize("symmetric", [True, False])
def test_moco_step_loss_queue_and_key_side(symmetric: bool) -> None:
    method = _tiny(symmetric)
    method.train()
    x_a, x_b = _views()
    key_params = list(method.key_encoder.parameters()) + list(method.key_projector.parameters())
    assert key_params and not any(p.requires_grad for p in key_params)
    queue_before = method.queue.keys.clone()
    key_before = [p.detach().clone() for p in key_params]

    loss = method.training_step(x_a, x_b)

    # Reference from the definition: queries through f_q+g_q (one BN batch of the views used),
    # keys through f_k+g_k, InfoNCE against the queue as it was before this step.
    with torch.no_grad():
        qs = method.projector(method.encoder(torch.cat([x_a, x_b]) if symmetric else x_a))
        ks = F.normalize(method.key_projector(method.key_encoder(torch.cat([x_b, x_a]) if symmetric else x_b)), dim=1)
        pairs = [(qs[:N], ks[:N]), (qs[N:], ks[N:])] if symmetric else [(qs, ks)]
        expected = sum(info_nce_loss(q, k, queue_before, 0.2) for q, k in pairs) / len(pairs)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # The step's keys entered the queue in order at the pointer; the rest is untouched.
    n_new = len(ks)
    torch.testing.assert_close(method.queue.keys[:n_new], ks, rtol=1e-5, atol=1e-6)
    assert torch.equal(method.queue.keys[n_new:], queue_before[n_new:])
    assert int(method.queue.ptr) == n_new

    optimizer = build_optimizer(method, method.cfg)
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in key_params)
    assert all(p.grad is not None for p in method.encoder.parameters())
    assert method.queue.keys.grad is None
    optimizer.step()
    assert all(torch.equal(p, p0) for p, p0 in zip(key_params, key_before, strict=True))

    # Only the momentum update moves the key side: theta_k <- m theta_k + (1 - m) theta_q.
    online = list(method.encoder.parameters()) + list(method.projector.parameters())
    assert any(not torch.equal(q, k) for q, k in zip(online, key_params, strict=True))
    m = method.cfg.moco_momentum
    expected_k = [m * k.double() + (1 - m) * q.detach().double() for q, k in zip(online, key_params, strict=True)]
    method.on_after_optimizer_step(0, 10)
    for p, e in zip(key_params, expected_k, strict=True):
        torch.testing.assert_close(p.double(), e, rtol=1e-6, atol=1e-7)


def test_moco_head_outputs_are_centred_per_bn_batch() -> None:
    """The output BN of g (MoCo v3's projector): in a training batch every output dimension has
    mean 0 and variance 1, so keys of different images share no common direction."""
    method = _tiny()
    method.train()
    x_a, _ = _views()
    with torch.no_grad():
        z = method._query(x_a).double()  # [N, P], before normalisation
    torch.testing.assert_close(z.mean(0), torch.zeros(z.shape[1], dtype=torch.float64), rtol=0, atol=1e-6)
    torch.testing.assert_close(z.var(0, unbiased=False), torch.ones(z.shape[1], dtype=torch.float64), rtol=0, atol=1e-3)


def test_moco_single_process_split_bn_groups_keys_by_random_permutation() -> None:
    method = _tiny()
    method.bn_groups = 2  # what a batch of 64 gets; here on 8 images to stay fast
    x_a, x_b = _views()
    torch.manual_seed(5)
    keys = method._shuffled_keys([x_b, x_a])  # 2 x [N, P]
    torch.manual_seed(5)
    perm = torch.randperm(N)
    with torch.no_grad():
        for group in perm.chunk(2):  # each group's BN statistics come from its own 4 images x 2 views
            expected = method._key(torch.cat([x_b[group], x_a[group]]))  # [8, P]
            torch.testing.assert_close(keys[0][group], expected[: len(group)], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(keys[1][group], expected[len(group) :], rtol=1e-5, atol=1e-6)
        whole = method._key(torch.cat([x_b, x_a]))  # one BN batch: differs, so the grouping is real
    assert not torch.allclose(keys[0], whole[:N], atol=1e-3)


# --- DDP: shuffle BN across ranks, keys gathered before enqueueing -----------------------

WORLD = 2
P = 16  # proj_out_dim of _tiny


def _rank_views(r: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + r)
    return torch.randn(N, 3, S, S, generator=g), torch.randn(N, 3, S, S, generator=g)


def _online(method: MoCoV2) -> list[torch.Tensor]:
    return list(method.encoder.parameters()) + list(method.projector.parameters())


def _key_side(method: MoCoV2) -> list[torch.Tensor]:
    return list(method.key_encoder.parameters()) + list(method.key_projector.parameters())


def _ddp_rank(r: int, init_method: str, out: str) -> None:
    """One optimiser step of MoCo as the engine runs it: DDP-wrapped, SGD, then the momentum update."""
    torch.set_num_threads(1)  # as the parent's reference (conftest), so the float sums agree
    with distributed.process_group(r, WORLD, "gloo", init_method):
        method = _tiny()
        model = DistributedDataParallel(method)  # broadcasts buffers (queue, BN statistics) every forward
        optimizer = build_optimizer(method, method.cfg)
        x_a, x_b = _rank_views(r)
        torch.manual_seed(7)  # rank 0's key permutation, broadcast to rank 1
        loss = model(x_a, x_b)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.on_after_optimizer_step(0, 10)
        torch.save(
            {"loss": loss.detach(), "queue": method.queue.keys, "ptr": method.queue.ptr,
             "online": [p.detach() for p in _online(method)], "key": [p.detach() for p in _key_side(method)]},
            Path(out) / f"rank{r}.pt",
        )  # fmt: skip


@pytest.mark.integration
@pytest.mark.slow
def test_moco_ddp_step_shuffles_bn_gathers_keys_and_matches_one_process(tmp_path: Path) -> None:
    init_method = f"tcp://127.0.0.1:{free_port()}"
    mp.start_processes(_ddp_rank, args=(init_method, str(tmp_path)), nprocs=WORLD, start_method="spawn")
    got = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]

    # Reference in one process. Keys: the 2N images of both ranks permuted with rank 0's draw;
    # slice r of the permutation is one key-encoder BN batch (both views), then keys go home.
    method = _tiny()
    views = [_rank_views(r) for r in range(WORLD)]
    every_a, every_b = torch.cat([v[0] for v in views]), torch.cat([v[1] for v in views])  # [2N, ...]
    torch.manual_seed(7)
    perm = torch.randperm(WORLD * N)
    key_b, key_a = torch.empty(WORLD * N, P), torch.empty(WORLD * N, P)
    with torch.no_grad():
        for idx in perm.view(WORLD, N):
            k = method._key(torch.cat([every_b[idx], every_a[idx]]))  # views_k = [x_b, x_a]
            key_b[idx], key_a[idx] = k[:N], k[N:]
    rows = lambda r: slice(r * N, (r + 1) * N)
    queue_before = method.queue.keys.clone()
    key_before = [p.detach().clone() for p in _key_side(method)]
    # Queries: each rank's own images in its own BN batch; InfoNCE against the queue before the step.
    losses = []
    for r, (x_a, x_b) in enumerate(views):
        q_a, q_b = method._query(torch.cat([x_a, x_b])).chunk(2)  # [N, P] each
        t = method.cfg.temperature
        losses.append(
            (info_nce_loss(q_a, key_b[rows(r)], queue_before, t) + info_nce_loss(q_b, key_a[rows(r)], queue_before, t))
            / 2
        )
    for r in range(WORLD):
        assert got[r]["loss"].item() == pytest.approx(losses[r].item(), rel=1e-5)
    # DDP averages the ranks' gradients: the step equals one on the mean of the two losses.
    optimizer = build_optimizer(method, method.cfg)
    optimizer.zero_grad()
    (sum(losses) / WORLD).backward()
    optimizer.step()
    for g in got:
        for p, p_ddp in zip(_online(method), g["online"], strict=True):
            torch.testing.assert_close(p_ddp, p.detach(), rtol=1e-4, atol=1e-6)
    # The key side moved by momentum from the updated online weights, identically on both ranks.
    m = method.cfg.moco_momentum
    for g in got:
        for k0, q, k in zip(key_before, _online(method), g["key"], strict=True):
            torch.testing.assert_close(k, m * k0 + (1 - m) * q.detach(), rtol=1e-4, atol=1e-6)
    for k0, k1 in zip(got[0]["key"], got[1]["key"], strict=True):
        assert torch.equal(k0, k1)
    # Queue = rank 0's keys (view-b keys, then view-a keys), then rank 1's, in gather order, on both ranks.
    expected = torch.cat([torch.cat([key_b[rows(r)], key_a[rows(r)]]) for r in range(WORLD)])  # [2 * 2N, P]
    for g in got:
        assert int(g["ptr"]) == 2 * WORLD * N
        torch.testing.assert_close(g["queue"][: len(expected)], expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(g["queue"][len(expected) :], queue_before[len(expected) :])  # same random init
    # Shuffle BN changed the keys: the same images in their own rank's BN batch give others.
    with torch.no_grad():
        unshuffled = method._key(torch.cat([every_b[rows(0)], every_a[rows(0)]]))[:N]
    assert not torch.allclose(unshuffled, key_b[rows(0)], atol=1e-3)


@pytest.mark.slow
def test_moco_engine_run_on_digits_keeps_queue_and_key_encoder_in_checkpoint(digits_path: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(
        method="moco_v2", image_size=16, small_stem=False, batch_size=32, queue_size=96, epochs=1, max_steps=4,
        num_workers=0, warmup_epochs=0, optimizer="sgd", base_lr=0.5, proj_hidden_dim=64, log_every_steps=1,
        moco_momentum=0.999, deterministic=True,  # rebuilt below bit for bit: fp32 (trainer/precision.py)
    )  # fmt: skip
    result = train(cfg, digits_path, tmp_path)
    assert result.step == 4 and math.isfinite(result.loss)
    state = load_checkpoint(checkpoint_path(tmp_path))["method"]
    assert int(state["queue.ptr"]) == (4 * 2 * 32) % 96  # 2N keys a step, wrapped
    torch.testing.assert_close(state["queue.keys"].norm(dim=1), torch.ones(96))
    # The key encoder moved by momentum (m = 0.999) only: a few thousandths of the query's drift.
    torch.manual_seed(cfg.seed)  # the engine's initial weights
    fresh = build_method(cfg)
    name = "encoder.net.conv1.weight"
    init, q, k = fresh.state_dict()[name], state[name], state["key_" + name]
    assert not torch.equal(k, init) and not torch.equal(k, q)
    assert float((k - init).abs().max()) < 0.02 * float((q - init).abs().max())
    encoder, _, _ = load_encoder(tmp_path)  # what export takes: the query f alone
    assert isinstance(encoder, Encoder)
