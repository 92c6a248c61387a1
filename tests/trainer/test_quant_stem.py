"""The pixel normalisation folded into the first convolution (trainer/quant_stem.py), checked
against the torch encoder fed float64-normalised pixels, and the int8 graph that reads the
uint8 pixels. Real colour images: patches of scikit-learn's sample photographs."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from onnxruntime.quantization.shape_inference import quant_pre_process

from service.contract.encoder_io import PIXEL_MEAN, PIXEL_STD
from service.contract.imaging import ResizePolicy
from service.contract.registry import ModelCard
from trainer.export import export_encoder, ort_session, quantize_int8
from trainer.models import Encoder
from trainer.quant_stem import PIXELS, fold_pixel_normalisation, read_raw_pixels


def _export(tmp_path: Path, small_stem: bool, size: int, photos: np.ndarray) -> tuple[Encoder, Path, np.ndarray]:
    torch.manual_seed(0)
    encoder = Encoder("resnet18", small_stem).eval()
    images = ResizePolicy(size).batch(photos[:48])  # uint8 [48, S, S, 3]
    card = ModelCard(
        model_id="x", method="simclr", backbone="resnet18", input_size=size, embedding_dim=512,
        resize_policy=ResizePolicy(size).to_json(), created_at="2025-01-01T00:00:00Z",
    )  # fmt: skip
    path = tmp_path / "model.onnx"
    export_encoder(encoder, path, card=card, parity_images=images[:8])
    return encoder, path, images


def _fold(path: Path, out: Path) -> onnx.ModelProto:
    quant_pre_process(str(path), str(out), skip_symbolic_shape=True)
    model = onnx.load(str(out))
    assert fold_pixel_normalisation(model)
    onnx.save(model, str(out))
    return model


def _padded_reference(encoder: Encoder, images: np.ndarray, fill: np.ndarray) -> np.ndarray:
    """What the folded graph claims to compute, in float64 outside it: the raw pixels padded by
    the first conv's padding with `fill` per channel, normalised, then the encoder with that
    convolution unpadded. Unit rows [N, D]."""
    encoder = copy.deepcopy(encoder)
    conv = encoder.net.conv1
    (pad, _), conv.padding = conv.padding, (0, 0)
    x = images.astype(np.float64)  # [N, S, S, 3]
    x = np.stack([np.pad(x[..., c], ((0, 0), (pad, pad), (pad, pad)), constant_values=fill[c]) for c in range(3)], -1)
    x = (x / 255.0 - np.asarray(PIXEL_MEAN)) / np.asarray(PIXEL_STD)  # [N, S + 2p, S + 2p, 3]
    with torch.inference_mode():
        h = encoder(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)))
    h = h.double().numpy()
    return h / np.linalg.norm(h, axis=1, keepdims=True)


@pytest.mark.parametrize(("small_stem", "size"), [(True, 16), (False, 32)])
def test_the_folded_stem_computes_the_padded_normalised_convolution(tmp_path, photos, small_stem, size) -> None:
    """Against float64 preprocessing padded with round(255 * mean): equal to fp32 rounding; the
    stock graph (zero padding after normalising) differs from that reference by far more, so the
    check sees the padding, and a wrong bias or scale would be far outside it."""
    encoder, path, images = _export(tmp_path, small_stem, size, photos)
    _fold(path, tmp_path / "folded.onnx")
    folded = ort_session(tmp_path / "folded.onnx").run(None, {"images": images})[0]
    stock = ort_session(path).run(None, {"images": images})[0]
    reference = _padded_reference(encoder, images, np.round(255 * np.asarray(PIXEL_MEAN)))
    folded_err, stock_err = np.abs(folded - reference).max(), np.abs(stock - reference).max()
    assert folded_err < 2e-5, folded_err
    assert stock_err > 20 * folded_err, (stock_err, folded_err)


def test_the_int8_model_reads_the_uint8_pixels(tmp_path, photos) -> None:
    """No float pass over the input: the first DequantizeLinear takes the padded uint8 pixels at
    scale 1 and zero point 0, and nothing casts the images; the model still agrees with fp32."""
    _, path, images = _export(tmp_path, False, 32, photos)
    quantize_int8(path, tmp_path / "model.int8.onnx", images[:32])
    model = onnx.load(str(tmp_path / "model.int8.onnx"))
    produced = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    first = next(n for n in model.graph.node if n.op_type == "Conv")
    dq = produced[first.input[0]]
    assert dq.op_type == "DequantizeLinear" and produced[dq.input[0]].op_type == "Transpose"
    assert float(inits[dq.input[1]]) == 1.0 and int(inits[dq.input[2]]) == 0
    assert not any(n.op_type == "Cast" for n in model.graph.node) and PIXELS not in produced
    fp32 = ort_session(path).run(None, {"images": images})[0].astype(np.float64)
    int8 = ort_session(tmp_path / "model.int8.onnx").run(None, {"images": images})[0]
    assert np.min(np.sum(fp32 * int8, axis=1)) > 0.99


def test_a_graph_that_starts_otherwise_is_left_as_it_is() -> None:
    """A first op other than the exporter's normalisation: no fold, the model untouched."""
    w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["images"], ["x"], to=onnx.TensorProto.FLOAT),
         helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "g", [helper.make_tensor_value_info("images", onnx.TensorProto.UINT8, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w],
    )  # fmt: skip
    model = helper.make_model(graph)
    before = model.SerializeToString()
    assert not fold_pixel_normalisation(model)
    assert model.SerializeToString() == before


def test_pixels_quantised_at_another_scale_are_not_dropped(tmp_path, photos) -> None:
    """read_raw_pixels is exact only at scale 1: any other scale is an error, not a silent drop."""
    _, path, _ = _export(tmp_path, True, 16, photos)
    model = _fold(path, tmp_path / "folded.onnx")
    cast = next(n for n in model.graph.node if PIXELS in n.output)
    consumers = [n for n in model.graph.node if PIXELS in n.input]
    model.graph.initializer.extend(
        [numpy_helper.from_array(np.array(0.5, np.float32), "s"), numpy_helper.from_array(np.array(0, np.uint8), "z")]
    )
    model.graph.node.extend(
        [
            helper.make_node("QuantizeLinear", [PIXELS, "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
        ]
    )
    for node in consumers:
        node.input[0] = "dq"
    with pytest.raises(ValueError, match="scale 0.5"):
        read_raw_pixels(model)
    assert cast in model.graph.node
