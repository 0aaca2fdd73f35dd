"""Group normalisation in the convolutions' layout, in an exported ONNX graph.

tf2onnx runs a Keras (NHWC) network's convolutions in NCHW and cancels the transposes between them, but
Keras' GroupNormalization reshapes the channel axis into (groups, channels per group) in NHWC, which no
transpose can pass: every normalised convolution of ``--norm group`` comes out as Transpose -> seven
elementwise and reduction ops over a 5-D tensor -> activation -> Transpose. ``fuse_group_norms`` puts
each such block back in NCHW as the same arithmetic in standard ONNX ops:

    conv output (N, C, H, W) -> Reshape (N, G, C/G*H*W) -> InstanceNormalization (scale 1, bias 0, the
    layer's epsilon) -> Reshape (N, C, H, W) -> Mul gamma (C, 1, 1) -> Add beta (C, 1, 1) -> activation

(the channels of a group are adjacent in both layouts, and GroupNormalization's statistics are the mean
and the biased variance over a group's channels and pixels, which InstanceNormalization computes per
row), and hands the activation's NCHW output to what read the transposed one. ONNX Runtime and
OpenVINO run the two transposes fewer and their own normalisation kernels (docs/PERFORMANCE.md).

A block whose graph is not the expected one is left as it was: the result is always a valid graph
computing the network, fused or not; the count of fused blocks says which.
"""
from __future__ import annotations

import re

import numpy as np

NHWC_TO_NCHW = [0, 3, 1, 2]
NCHW_TO_NHWC = [0, 2, 3, 1]
ACTIVATIONS = ("Relu", "LeakyRelu")


def _perm(node) -> list[int] | None:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


def _in_scope(node_name: str, layer: str) -> bool:
    """Does an ONNX node belong to the Keras layer ``layer`` (tf2onnx names it ``model_1/layer_1/Op``)?"""
    return re.search(rf"(^|/){re.escape(layer)}(_\d+)?/", node_name) is not None


def fuse_group_norms(model, norms: dict) -> tuple[object, int]:
    """``model``: an onnx ModelProto of a Keras export; ``norms``: layer name -> (gamma, beta, epsilon,
    groups) of each GroupNormalization layer. Returns the model (changed in place) and how many of the
    layers were fused."""
    from onnx import helper, numpy_helper
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    added, inits, rename = [], [], {}
    for layer, (gamma, beta, eps, groups) in norms.items():
        scope = [n for n in g.node if _in_scope(n.name, layer)]
        entry = [n for n in scope if n.op_type == "Reshape" and n.input[0] in producer
                 and producer[n.input[0]].op_type == "Transpose" and _perm(producer[n.input[0]]) == NCHW_TO_NHWC]
        names = {n.name for n in scope}
        leaving = {o: c for n in scope for o in n.output for c in consumers.get(o, []) if c.name not in names}
        if len(entry) != 1 or len(leaving) != 1:
            continue
        (act,) = leaving.values()
        after = consumers.get(act.output[0], [])
        if act.op_type not in ACTIVATIONS or len(after) != 1 or after[0].op_type != "Transpose" \
                or _perm(after[0]) != NHWC_TO_NCHW:
            continue
        conv_out = producer[entry[0].input[0]].input[0]
        c = int(np.asarray(gamma).shape[0])
        p = f"nchw_{layer}"
        inits += [numpy_helper.from_array(np.array([0, groups, -1], np.int64), p + "_groups"),
                  numpy_helper.from_array(np.ones(groups, np.float32), p + "_ones"),
                  numpy_helper.from_array(np.zeros(groups, np.float32), p + "_zeros"),
                  numpy_helper.from_array(np.asarray(gamma, np.float32).reshape(c, 1, 1), p + "_gamma"),
                  numpy_helper.from_array(np.asarray(beta, np.float32).reshape(c, 1, 1), p + "_beta")]
        added += [helper.make_node("Shape", [conv_out], [p + "_shape"], name=p + "/Shape"),
                  helper.make_node("Reshape", [conv_out, p + "_groups"], [p + "_grouped"], name=p + "/Group"),
                  helper.make_node("InstanceNormalization", [p + "_grouped", p + "_ones", p + "_zeros"],
                                   [p + "_normed"], name=p + "/Normalize", epsilon=float(eps)),
                  helper.make_node("Reshape", [p + "_normed", p + "_shape"], [p + "_back"], name=p + "/Ungroup"),
                  helper.make_node("Mul", [p + "_back", p + "_gamma"], [p + "_scaled"], name=p + "/Gamma"),
                  helper.make_node("Add", [p + "_scaled", p + "_beta"], [p + "_shifted"], name=p + "/Beta"),
                  helper.make_node(act.op_type, [p + "_shifted"], [p + "_out"], name=p + "/" + act.op_type)]
        added[-1].attribute.extend(act.attribute)       # LeakyRelu's alpha
        rename[after[0].output[0]] = p + "_out"
    if not rename:
        return model, 0
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
    for o in g.output:
        if o.name in rename:          # never: a network's output is its sigmoid head
            return model, 0
    nodes = _needed_in_order(list(g.node) + added, [o.name for o in g.output],
                             {i.name for i in g.input} | {i.name for i in g.initializer} | {i.name for i in inits})
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in nodes for i in n.input}
    kept = [i for i in list(g.initializer) + inits if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    return model, len(rename)


def _needed_in_order(nodes: list, outputs: list[str], given: set[str]) -> list:
    """The nodes the graph's outputs depend on, each after the nodes it reads from."""
    producer = {o: n for n in nodes for o in n.output}
    need, stack = set(), list(outputs)
    while stack:
        t = stack.pop()
        n = producer.get(t)
        if n is not None and id(n) not in need:
            need.add(id(n))
            stack += list(n.input)
    done, order, pending = set(given) | {""}, [], [n for n in nodes if id(n) in need]
    while pending:
        rest = []
        for n in pending:
            if all(i in done for i in n.input):
                order.append(n)
                done.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError("the ONNX graph has a cycle or reads a tensor nothing writes")
        pending = rest
    return order


def group_norms_of(keras_model) -> dict:
    """layer name -> (gamma, beta, epsilon, groups) of every GroupNormalization layer of a Keras model."""
    out = {}
    for layer in keras_model.layers:
        if type(layer).__name__ == "GroupNormalization" and layer.scale and layer.center:
            out[layer.name] = (np.asarray(layer.gamma.numpy()), np.asarray(layer.beta.numpy()),
                               float(layer.epsilon), int(layer.groups))
    return out
