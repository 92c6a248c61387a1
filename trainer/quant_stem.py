"""The int8 variant's first convolution reads the uint8 pixels themselves.

The exported graph normalises in float32 before the first convolution: Cast, /255, NHWC->NCHW,
-PIXEL_MEAN, /PIXEL_STD over every pixel of the batch, and in the int8 model a QuantizeLinear
after them (6 elementwise passes over [N, 3, S, S] floats: 17% of the int8 model's time at 224
px, docs/benchmarks.md). The normalisation is affine per input channel, so it folds into the
first convolution:

    conv(W, (x/255 - m)/s) = conv(W / (255 s), x) - sum_{c,i,j} W[o,c,i,j] m_c / s_c

wherever the kernel covers real pixels. Zero padding of the normalised input is padding x with
255 m_c, done here in uint8 with round(255 m_c) (at most 0.5/255 off, a tenth of the int8
input's own step). The rewritten graph:

    images uint8 [N, S, S, 3] -> Split (channels) -> Pad (round(255 m_c), the conv's pads)
      -> Concat -> Transpose to NCHW -> Cast -> Conv(W', b', no pads)

and after static quantisation the Cast and its QuantizeLinear (scale 1, zero point 0: exact on
integers 0..255) are dropped, so the first QLinearConv takes the uint8 pixels: no float pass
over the input, and an input quantisation that loses nothing.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

PIXELS = "raw_pixel_stem/pixels"  # the first convolution's input: float32 [N, 3, S, S] of 0..255
_PREFIX = "raw_pixel_stem"
_CHAIN = ("Cast", "Div", "Transpose", "Sub", "Div", "Conv")  # what the exporter writes (EmbeddingGraph)


class _Mismatch(ValueError):
    """The graph does not start with the normalisation this module folds."""


def _only_consumer(graph: onnx.GraphProto, tensor: str, op: str) -> onnx.NodeProto:
    found = [n for n in graph.node if tensor in n.input]
    if len(found) != 1 or found[0].op_type != op:
        raise _Mismatch(f"{tensor} feeds {[n.op_type for n in found]}, expected one {op}")
    return found[0]


def fold_pixel_normalisation(model: onnx.ModelProto) -> bool:
    """Rewrite `model` (fp32, BatchNorm folded: after quant_pre_process) in place so that its
    first convolution takes the pixels as 0..255 floats (module docstring); False, and the
    model untouched, when the graph does not start the way the exporter writes it."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    try:
        chain, tensor = [], graph.input[0].name
        for op in _CHAIN:
            chain.append(_only_consumer(graph, tensor, op))
            tensor = chain[-1].output[0]
        cast, div255, transpose, sub, div_std, conv = chain
        perm = next((list(helper.get_attribute_value(a)) for a in transpose.attribute if a.name == "perm"), None)
        attrs = {a.name: helper.get_attribute_value(a) for a in conv.attribute}
        consts = [div255.input[1], sub.input[1], div_std.input[1], *conv.input[1:]]
        if any(name not in inits for name in consts) or len(conv.input) != 3:
            raise _Mismatch("constants or the conv's bias are not initializers")
        scale, mean, std, w, b = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in consts)
        if float(scale) != 255.0 or perm != [0, 3, 1, 2] or mean.size != 3 or std.size != 3:
            raise _Mismatch("not /255, NHWC->NCHW and a per-channel mean and std")
        if attrs.get("group", 1) != 1 or attrs.get("auto_pad", b"NOTSET") != b"NOTSET" or w.shape[1] != 3:
            raise _Mismatch("a grouped or auto-padded first convolution")
    except _Mismatch:
        return False
    fill = np.round(255 * mean.reshape(3))  # [3] raw value that normalises to ~0
    w_raw = w / (255 * std.reshape(3))[None, :, None, None]  # [O, 3, kh, kw]
    b_raw = b - np.einsum("ocij,c->o", w_raw, 255 * mean.reshape(3))  # [O]
    top, left, bottom, right = attrs.get("pads", [0, 0, 0, 0])

    def name(part: str) -> str:
        return f"{_PREFIX}/{part}"

    channels = [name(f"c{c}") for c in range(3)]
    padded = [name(f"padded{c}") for c in range(3)]
    nodes = [helper.make_node("Split", [graph.input[0].name], channels, axis=3, num_outputs=3, name=name("Split"))]
    nodes += [
        helper.make_node("Pad", [channels[c], name("pads"), name(f"fill{c}")], [padded[c]], name=name(f"Pad{c}"))
        for c in range(3)
    ]
    nodes += [
        helper.make_node("Concat", padded, [name("nhwc")], axis=3, name=name("Concat")),
        helper.make_node("Transpose", [name("nhwc")], [name("nchw")], perm=[0, 3, 1, 2], name=name("Transpose")),
        helper.make_node("Cast", [name("nchw")], [PIXELS], to=onnx.TensorProto.FLOAT, name=name("Cast")),
        helper.make_node(
            "Conv",
            [PIXELS, name("W"), name("B")],
            list(conv.output),
            name=conv.name,
            **{k: v for k, v in attrs.items() if k != "pads"},
        ),
    ]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0, top, left, 0, 0, bottom, right, 0], np.int64), name("pads")),
            *(numpy_helper.from_array(np.array(fill[c], np.uint8), name(f"fill{c}")) for c in range(3)),
            numpy_helper.from_array(w_raw.astype(np.float32), name("W")),
            numpy_helper.from_array(b_raw.astype(np.float32), name("B")),
        ]
    )
    at = list(graph.node).index(cast)
    for node in chain:
        graph.node.remove(node)
    for offset, node in enumerate(nodes):
        graph.node.insert(at + offset, node)
    return True


def read_raw_pixels(model: onnx.ModelProto) -> None:
    """After static quantisation of a folded model: drop Cast -> QuantizeLinear(scale 1, zero
    point 0) before the first convolution, so that its DequantizeLinear reads the uint8 pixels.
    Raises ValueError when the quantiser chose another scale (the drop would not be exact)."""
    graph = model.graph
    cast = next(n for n in graph.node if PIXELS in n.output)
    quantize = _only_consumer(graph, PIXELS, "QuantizeLinear")
    inits = {i.name: i for i in graph.initializer}
    scale, zero = (numpy_helper.to_array(inits[name]) for name in quantize.input[1:3])
    if float(scale) != 1.0 or int(zero) != 0 or zero.dtype != np.uint8:
        raise ValueError(f"the pixels were quantised with scale {scale} and zero point {zero}, not 1 and uint8 0")
    for node in graph.node:
        for i, tensor in enumerate(node.input):
            if tensor == quantize.output[0]:
                node.input[i] = cast.input[0]
    graph.node.remove(quantize)
    graph.node.remove(cast)
