"""ONNX classifiers written the way other frameworks' exporters write them, built with onnx.helper (no downloads).

What `packager build` meets in the wild (issue 15): weights held in `Constant` nodes rather than initializers,
BatchNormalization left unfused after every convolution, MobileNetV3-style hard-swish (`x * HardSigmoid(x)`, no
HardSwish op before opset 14) and hard-sigmoid squeeze-excitation blocks, an old opset (11), and for the detector
kind dynamic height and width with an upsampling path whose size comes from another tensor's `Shape`.

The convolution weights are random (He init, BatchNormalization statistics random too); the classifier head is
fitted to sklearn's digits by ridge regression on the network's own features, so the model is a real classifier
(well above chance) with margins a quantizer can keep or lose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SE_ALPHA = 1.0 / 6.0  # MobileNetV3's hard sigmoid: relu6(x + 3) / 6
SE_BETA = 0.5


@dataclass
class _Graph:
    """Accumulates nodes; every weight becomes a `Constant` node (or an initializer, to compare)."""

    rng: np.random.Generator
    x_fit: np.ndarray  # BatchNormalization statistics are measured on these rows, as training would have
    hw: list[int | str]
    opset: int
    constants: bool = True
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    inits: list[onnx.TensorProto] = field(default_factory=list)
    n: int = 0

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}_{self.n}"

    def const(self, arr: np.ndarray, prefix: str = "w") -> str:
        name = self.name(prefix)
        tensor = numpy_helper.from_array(np.ascontiguousarray(arr), name)
        if self.constants:
            self.nodes.append(helper.make_node("Constant", [], [name], name=name + "_const", value=tensor))
        else:
            self.inits.append(tensor)
        return name

    def op(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        out = self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, **attrs))
        return out

    def conv(self, x: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1, bias: bool = False) -> str:
        w = self.rng.normal(0.0, np.sqrt(2.0 / (cin // group * k * k)), (cout, cin // group, k, k)).astype(np.float32)
        ins = [x, self.const(w)]
        if bias:
            ins.append(self.const(self.rng.normal(0.0, 0.05, cout).astype(np.float32), "b"))
        pad = k // 2
        return self.op("Conv", ins, kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group)

    def model(self, outputs: list[str], sizes: list[list[int | str]]) -> onnx.ModelProto:
        inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, *self.hw])
        outs = [helper.make_tensor_value_info(o, TensorProto.FLOAT, s) for o, s in zip(outputs, sizes, strict=True)]
        gr = helper.make_graph(self.nodes, "foreign_mobile", [inp], outs, initializer=self.inits)
        m = helper.make_model(gr, opset_imports=[helper.make_opsetid("", self.opset)],
                              producer_name="foreign-exporter", producer_version="2.6")
        m.ir_version = 7  # what opset-11 exporters write
        onnx.checker.check_model(m)
        return m

    def run(self, name: str) -> np.ndarray:
        import onnxruntime as ort

        m = self.model([name], [[]])
        del m.graph.output[0].type.tensor_type.shape.dim[:]
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return np.asarray(sess.run(None, {"x": self.x_fit})[0], np.float64)

    def bn(self, x: str, c: int) -> str:
        # Running statistics as training leaves them: the mean and variance of what reaches the layer.
        y = self.run(x)
        gamma = self.rng.uniform(0.6, 1.4, c).astype(np.float32)
        beta = self.rng.normal(0.0, 0.2, c).astype(np.float32)
        mean = y.mean(axis=(0, 2, 3)).astype(np.float32)
        var = y.var(axis=(0, 2, 3)).astype(np.float32)
        return self.op("BatchNormalization", [x, self.const(gamma), self.const(beta), self.const(mean),
                                              self.const(var)], epsilon=1e-3)

    def hard_swish(self, x: str) -> str:
        return self.op("Mul", [x, self.op("HardSigmoid", [x], alpha=SE_ALPHA, beta=SE_BETA)])

    def se(self, x: str, c: int) -> str:
        s = self.op("GlobalAveragePool", [x])
        s = self.op("Relu", [self.conv(s, c, max(c // 4, 4), 1, bias=True)])
        s = self.op("HardSigmoid", [self.conv(s, max(c // 4, 4), c, 1, bias=True)], alpha=SE_ALPHA, beta=SE_BETA)
        return self.op("Mul", [x, s])

    def dense(self, x: str, w: np.ndarray, b: np.ndarray) -> str:
        # tf2onnx and paddle2onnx write MatMul + Add; the bias is a Constant too.
        return self.op("Add", [self.op("MatMul", [x, self.const(w.astype(np.float32))]),
                               self.const(b.astype(np.float32), "b")])


def _features(g: _Graph, x: str, width: int, fpn: bool) -> tuple[str, int]:
    c = width
    y = g.hard_swish(g.bn(g.conv(x, 1, c, 3), c))
    # block 1: depthwise 3x3, BN, ReLU, squeeze-excitation, pointwise projection, BN
    y = g.op("Relu", [g.bn(g.conv(y, c, c, 3, group=c), c)])
    y = g.se(y, c)
    b1 = g.bn(g.conv(y, c, 2 * c, 1), 2 * c)
    # block 2: expand, depthwise stride 2, SE, project
    y = g.hard_swish(g.bn(g.conv(b1, 2 * c, 4 * c, 1), 4 * c))
    y = g.hard_swish(g.bn(g.conv(y, 4 * c, 4 * c, 3, stride=2, group=4 * c), 4 * c))
    y = g.se(y, 4 * c)
    y = g.bn(g.conv(y, 4 * c, 4 * c, 1), 4 * c)
    if fpn:
        # A text detector's feature pyramid: upsample the coarse map to the fine map's size, taken from its Shape
        # (dynamic H/W), and add the fine map projected to the same channels.
        # The scales are computed at run time (fine size / coarse size), as a detector's exporter writes them.
        def hw_of(t: str) -> str:
            return g.op("Cast", [g.op("Slice", [g.op("Shape", [t]), g.const(np.array([2], np.int64), "s"),
                                                g.const(np.array([4], np.int64), "e")])], to=TensorProto.FLOAT)

        scales = g.op("Concat", [g.const(np.ones(2, np.float32), "one"), g.op("Div", [hw_of(b1), hw_of(y)])], axis=0)
        up = g.op("Resize", [y, g.const(np.zeros(0, np.float32), "roi"), scales], mode="nearest")
        y = g.op("Relu", [g.op("Add", [up, g.bn(g.conv(b1, 2 * c, 4 * c, 1), 4 * c)])])
    pooled = g.op("Flatten", [g.op("GlobalAveragePool", [y])], axis=1)
    return pooled, 4 * c


def build_classifier(x_fit: np.ndarray, y_fit: np.ndarray, *, seed: int = 0, width: int = 32, opset: int = 11,
                     dynamic_hw: bool = False, constants: bool = True, hidden: int = 256) -> onnx.ModelProto:
    """A foreign-exported MobileNetV3-style classifier over [N, 1, H, W] float inputs (10 classes).

    `dynamic_hw`: H and W are symbolic and the graph has a detector's upsampling path (`Resize` to a `Shape`).
    The head (a hidden layer with hard-swish, then 10 logits) is fitted to (`x_fit`, `y_fit`).
    """
    import onnxruntime as ort

    def graph(head: tuple[np.ndarray, np.ndarray] | None) -> onnx.ModelProto:
        hw: list[int | str] = ["H", "W"] if dynamic_hw else [int(x_fit.shape[2]), int(x_fit.shape[3])]
        g = _Graph(np.random.default_rng(seed), x_fit[:256].astype(np.float32), hw, opset, constants=constants)
        feats, dim = _features(g, "x", width, dynamic_hw)
        hrng = np.random.default_rng(seed + 1000)
        w1 = hrng.normal(0.0, np.sqrt(2.0 / dim), (dim, hidden)).astype(np.float32)
        b1 = hrng.normal(0.0, 0.05, hidden).astype(np.float32)
        hid = g.hard_swish(g.dense(feats, w1, b1))
        out = hid if head is None else g.dense(hid, head[0], head[1])
        g.nodes.append(helper.make_node("Identity", [out], ["logits"], name="logits_identity"))
        return g.model(["logits"], [["N", 10 if head is not None else hidden]])

    feat_model = graph(None)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(feat_model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    h = sess.run(None, {"x": x_fit.astype(np.float32)})[0].astype(np.float64)
    onehot = np.eye(10)[y_fit]
    # Ridge regression onto +-1 targets, centred; the regularisation (relative to the features' energy) keeps the
    # weights small, so the logits do not hang on tiny feature differences a quantizer would blur.
    mu = h.mean(0)
    hc = h - mu
    lam = 0.05 * float(np.trace(hc.T @ hc)) / hc.shape[1]
    w = np.linalg.solve(hc.T @ hc + lam * np.eye(hc.shape[1]), hc.T @ (2.0 * onehot - 1.0))
    w2 = w.astype(np.float32)
    b2 = (-(mu @ w) + (2.0 * onehot - 1.0).mean(0)).astype(np.float32)
    return graph((w2, b2))


def upsample(x: np.ndarray, factor: int) -> np.ndarray:
    """Nearest upsampling of [N, C, H, W] images (bigger inputs: more work per call, like a real image model)."""
    return np.ascontiguousarray(x.repeat(factor, axis=2).repeat(factor, axis=3))
