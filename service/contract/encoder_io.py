"""The exported encoder's interface, shared by the trainer that writes it and the server that runs it.

The ONNX graph takes `INPUT_NAME`: uint8 [N, S, S, 3] RGB (the resize policy's output) and
gives `OUTPUT_NAME`: float32 [N, D], unit rows. Inside it: cast, /255, NHWC -> NCHW and
(x - PIXEL_MEAN) / PIXEL_STD, the normalisation training applies after augmentation
(ImageNet statistics, as in SimCLR's and torchvision's ResNet recipes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnxruntime

INPUT_NAME, OUTPUT_NAME = "images", "embedding"
PIXEL_MEAN = (0.485, 0.456, 0.406)
PIXEL_STD = (0.229, 0.224, 0.225)


def ort_session_options(
    intra_op_threads: int = 0, inter_op_threads: int = 1, spin_wait: bool = False
) -> onnxruntime.SessionOptions:
    """The ONNX Runtime options the server runs with (export's parity check uses the same):
    every graph optimisation, sequential execution; 0 intra-op threads = ONNX Runtime's default;
    `spin_wait`: the intra-op threads busy-wait for the next call (ONNX Runtime's default) and
    save a wake-up per call, but hold cores that the server's decoding threads want (off: /embed
    +4-5% on 2 cores, docs/benchmarks.md).
    ONNX Runtime is imported here, not at module level: the base install has none."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = inter_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
    return options
