"""Cost accounting for the speed bounds: which weights a graph's matmuls read, and how often."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from subfit_fx.exporters.bench import matmul_weight_params


def _graph_with_shared_and_tied_weights(path):
    # x @ W, (x @ W) @ W^T... : W (4x4) used by two MatMuls, E (5x4) used through a Transpose
    # as a tied lm_head is, and a bias that no matmul reads
    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    e = numpy_helper.from_array(np.ones((5, 4), np.float32), "E")
    b = numpy_helper.from_array(np.ones((5,), np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h1"]),
        helper.make_node("MatMul", ["h1", "W"], ["h2"]),
        helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0]),
        helper.make_node("MatMul", ["h2", "Et"], ["h3"]),
        helper.make_node("Add", ["h3", "b"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])], [w, e, b])
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_weights_count_once_for_bytes_and_per_use_for_flops(tmp_path):
    path = _graph_with_shared_and_tied_weights(tmp_path / "g.onnx")
    assert matmul_weight_params(path) == 16 + 20  # W once, E through its Transpose, no bias
    assert matmul_weight_params(path, per_use=True) == 2 * 16 + 20
