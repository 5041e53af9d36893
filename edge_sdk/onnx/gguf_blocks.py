"""Put the GGUF's own 4-bit blocks into the int4 graph, instead of quantizing a second time.

The model builder quantizes the fp32 weights it is given (round-to-nearest, blocks of 32). Those
weights are already the GGUF's dequantized Q4_1 blocks, so a second rounding lands on a
different 4-bit grid: on SmolLM2-135M that alone cost top-1 0.69 / KL 0.48 against the GGUF
(BENCHMARKS.md). The builder's `MatMulNBits` uses the same block size (32, along the input
axis) as Q4_0 / Q4_1, so the GGUF's codes can be copied in exactly:

- Q4_0 (`w = d * (q - 8)`): codes and `d` go in as they are (implicit zero point 8).
- Q4_1 (`w = d * q + m`): `w = d * (q - 8) + (m + 8d)`. The codes and `d` go in; the per-block
  offset `c = m + 8d` becomes a small exact correction `y += blocksum(x) @ C`, with
  `blocksum(x)` the sums of `x` over each block of 32 inputs (1/32 of the MatMul's work, fp32),
  computed once per distinct input (q/k/v and gate/up also share one MatMulNBits: `_add_offsets`).
  A float zero point would say the same in one node, but ONNX Runtime's CPU kernel then leaves
  its fast path (50 ms instead of 0.03 ms for one 576x1536 decode step, measured).
- Q8_0 (`w = d * q`, q int8) into an 8-bit `MatMulNBits` (implicit zero point 128): u = q + 128.

Other GGUF types (Q4_K, Q5_0, Q6_K, ...: Gemma 3's file) keep the builder's quantization.
Rows of llama's Q/K are stored permuted in the GGUF; the same row permutation as the loader's
(`unpermute_qk`) is applied to the blocks.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk.models.config import ModelConfig
from edge_sdk.models.naming import LORA_TARGETS, gguf_stem
from edge_sdk.models.qk_order import PERMUTED_ARCHS, unpermute_qk

log = logging.getLogger(__name__)

_NODE = re.compile(r"^/model/layers\.(\d+)/(?:attn|mlp)/(\w+_proj)/MatMul_Q\d+$")
BLOCK = 32


def _codes(
    raw: np.ndarray, kind: str, rows: int, cols: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes (rows, nb, 32) uint8 in 0..15 or 0..255, d (rows, nb), offset (rows, nb) | None)."""
    nb = cols // BLOCK
    if kind == "Q4_1":
        blocks = raw.reshape(rows, nb, 20)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        qs = blocks[..., 4:20]
    elif kind == "Q4_0":
        blocks = raw.reshape(rows, nb, 18)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        m = None
        qs = blocks[..., 2:18]
    elif kind == "Q8_0":
        blocks = raw.reshape(rows, nb, 34)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
        q = blocks[..., 2:34].copy().view(np.int8).astype(np.int16) + 128
        return q.astype(np.uint8), d, None
    else:
        raise ValueError(kind)
    # ggml nibble order: byte j holds element j (low) and element j + 16 (high)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return q, d, (m + 8.0 * d if m is not None else None)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits layout (rows, nb, 32 * bits / 8): 4-bit pairs low nibble first."""
    if bits == 8:
        return np.ascontiguousarray(q)
    return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4))


def transcode(model_path: Path, gguf_path: Path, config: ModelConfig) -> dict[str, int]:
    """Replace the builder's requantized weights in `model_path` by the GGUF's blocks.

    Returns {GGUF type: nodes replaced}. The model is saved in place (external data beside it).
    """
    import onnx
    from onnx import helper, numpy_helper

    from edge_sdk.models.gguf_meta import read_gguf

    reader: Any = read_gguf(gguf_path)
    tensors = {t.name: t for t in reader.tensors}
    model = onnx.load(str(model_path))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    permuted = config.arch in PERMUTED_ARCHS
    done: dict[str, int] = {}
    groups: dict[str, list[_Offset]] = {}  # input name -> its Q4_1 projections (q/k/v, gate/up)
    for node in list(graph.node):
        if node.op_type != "MatMulNBits":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("block_size") != BLOCK or len(node.input) not in (3, 4):
            continue
        match = _NODE.match(node.name)
        if match and match.group(2) in LORA_TARGETS:
            layer, target = int(match.group(1)), match.group(2)
            name = gguf_stem(layer, target) + ".weight"
        elif node.name.startswith("/lm_head/"):
            layer, target = -1, "lm_head"
            name = "output.weight" if "output.weight" in tensors else "token_embd.weight"
        else:
            continue
        t = tensors.get(name)
        kind = getattr(getattr(t, "tensor_type", None), "name", None)
        bits = attrs["bits"]
        if t is None or kind is None or (bits, kind) not in ((4, "Q4_0"), (4, "Q4_1"), (8, "Q8_0")):
            continue
        n_out, k_in = attrs["N"], attrs["K"]
        raw = np.asarray(t.data).reshape(-1)
        q, d, offset = _codes(raw, kind, n_out, k_in)
        if permuted and target in ("q_proj", "k_proj"):
            heads = config.n_head if target == "q_proj" else config.n_kv_head
            order = unpermute_qk(np.arange(n_out), heads)
            q, d = q[order], d[order]
            offset = offset[order] if offset is not None else None
        b_name, s_name = node.input[1], node.input[2]
        want_b = list(inits[b_name].dims)
        packed = _pack(q, bits).reshape(want_b)
        inits[b_name].CopyFrom(numpy_helper.from_array(packed, b_name))
        inits[s_name].CopyFrom(
            numpy_helper.from_array(d.reshape(list(inits[s_name].dims)).astype(np.float32), s_name)
        )
        if len(node.input) == 4 and node.input[3] in inits:
            # Explicit zero points (asymmetric builds): the implicit ones, 8 or 128, written out.
            zp = inits[node.input[3]]
            mid = 0x88 if bits == 4 else 128
            inits[zp.name].CopyFrom(
                numpy_helper.from_array(np.full(list(zp.dims), mid, np.uint8), zp.name)
            )
        if offset is not None:
            groups.setdefault(node.input[0], []).append(
                _Offset(node, attrs, np.ascontiguousarray(offset.T.astype(np.float32)))
            )
        done[kind] = done.get(kind, 0) + 1
    if not done:
        return done
    added: list[Any] = []
    gone: set[str] = set()
    for x, members in groups.items():
        nodes, removed = _add_offsets(graph, x, members)
        added += nodes
        gone |= removed
    keep = [n for n in graph.node if n.name not in gone]
    del graph.node[:]
    graph.node.extend(keep + added)
    _drop_unused_initializers(graph)
    _fix_tied_embedding(graph)
    _toposort(graph)
    data = model_path.with_name(model_path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save(
        model,
        str(model_path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data.name,
        size_threshold=1024,
    )
    log.info("copied GGUF blocks into %s: %s", model_path, done)
    return done


@dataclass
class _Offset:
    """One Q4_1 projection whose per-block offsets still have to be added."""

    node: Any
    """Its MatMulNBits node (GGUF codes and scales already in place)."""
    attrs: dict[str, Any]
    """The node's attributes (K, N, bits, block_size, accuracy_level)."""
    c: np.ndarray
    """The offsets `m + 8d` as (K / 32, N) fp32: `y += blocksum(x) @ c`."""


def _add_offsets(
    graph: Any, x: str, members: list[_Offset], sums: str | None = None
) -> tuple[list[Any], set[str]]:
    """Add `blocksum(x) @ C` to the projections that read `x`, with as few nodes as possible.

    Decode runs each node once per token, and onnxruntime's fixed cost per node (~10-20 us of
    CPU at M=1 on the loaded test machine) is as large as these small nodes' arithmetic
    (BENCHMARKS.md, "Speed against llama.cpp"). So the projections that share an input (q/k/v,
    gate/up) become one MatMulNBits over their concatenated rows (the blocks run along the input
    axis, so rows are independent and the codes stay the GGUF's) and one offset MatMul against
    the concatenated C; their LoRA outputs are concatenated, and grid + offset + LoRA is one
    `Sum` (the same fp32 additions, in the same order, as the two Adds it replaces). q/k/v then
    go to GroupQueryAttention packed (its packed-QKV input); other consumers get a Split.
    Returns (nodes to add, names of the nodes to remove): `graph.node` is rebuilt once, after all
    inputs, because rebuilding it detaches the node objects held in `members`.
    """
    from onnx import helper, numpy_helper

    first = members[0]
    nodes: list[Any] = []
    if sums is None:
        # Reshape + ReduceSum, not a MatMul against a 0/1 block indicator: the MatMul sums in
        # another order, which moved one of 149 SmolLM2 top-1 tokens (0.973 -> 0.966) for no
        # speed gain measurable here (BENCHMARKS.md, "Speed against llama.cpp").
        k_in, stem = first.attrs["K"], f"{first.node.name}_blocksum"
        shape = numpy_helper.from_array(
            np.array([0, 0, k_in // BLOCK, BLOCK], np.int64), f"{stem}/shape"
        )
        axes = numpy_helper.from_array(np.array([-1], np.int64), f"{stem}/axes")
        graph.initializer.extend([shape, axes])
        sums = f"{stem}/output_0"
        nodes += [
            helper.make_node(
                "Reshape", [x, shape.name], [f"{stem}/blocks"], name=f"{stem}/Reshape"
            ),
            helper.make_node(
                "ReduceSum",
                [f"{stem}/blocks", axes.name],
                [sums],
                name=f"{stem}/ReduceSum",
                keepdims=0,
            ),
        ]
    extra_gone: set[str] = set()
    same = {k: v for k, v in first.attrs.items() if k != "N"}
    if len(members) > 1 and not all(
        len(m.node.input) == 3 and {k: v for k, v in m.attrs.items() if k != "N"} == same
        for m in members
    ):  # not expected from the builder (zero points, mixed settings): one group per projection
        for m in members[1:]:
            more, more_gone = _add_offsets(graph, x, [m], sums)
            nodes += more
            extra_gone |= more_gone
        members = members[:1]
    readers: dict[str, list[Any]] = {}
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    outs = [m.node.output[0] for m in members]
    loras = [readers.get(o, []) for o in outs]
    use_lora = all(
        len(r) == 1 and r[0].op_type == "Add" and r[0].name.endswith("/lora/Add") for r in loras
    )
    finals = [r[0].output[0] for r in loras] if use_lora else outs
    gone = extra_gone | ({r[0].name for r in loras} if use_lora else set())
    if len(members) == 1:
        mnb, name = first.node, first.node.name
        c_name = f"{mnb.input[1]}_offset"
        graph.initializer.append(numpy_helper.from_array(first.c, c_name))
    else:
        inits = {i.name: i for i in graph.initializer}
        sizes = [int(m.attrs["N"]) for m in members]
        parts = first.node.name.split("/")
        targets = "+".join(m.node.name.split("/")[-2] for m in members)
        name = "/".join(parts[:-2] + [targets, parts[-1]])
        b = np.concatenate([numpy_helper.to_array(inits[m.node.input[1]]) for m in members])
        scale_dims = list(inits[first.node.input[2]].dims)
        scales = np.concatenate(
            [
                numpy_helper.to_array(inits[m.node.input[2]]).reshape(n, -1)
                for m, n in zip(members, sizes, strict=True)
            ]
        )
        scales = scales.reshape(-1) if len(scale_dims) == 1 else scales
        b_name, s_name = f"{name}.weight_Q{first.attrs['bits']}", f"{name}.weight_scales"
        c_name = f"{b_name}_offset"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.ascontiguousarray(b), b_name),
                numpy_helper.from_array(np.ascontiguousarray(scales), s_name),
                numpy_helper.from_array(
                    np.ascontiguousarray(np.concatenate([m.c for m in members], axis=1)), c_name
                ),
            ]
        )
        mnb = helper.make_node(
            "MatMulNBits",
            [x, b_name, s_name],
            [""],
            name=name,
            domain=first.node.domain,
            **{**first.attrs, "N": sum(sizes)},
        )
        nodes.append(mnb)
        gone |= {m.node.name for m in members}
    mnb.output[0] = f"{name}/grid"
    y = finals[0] if len(members) == 1 else f"{name}/output_0"
    terms = [f"{name}/grid", f"{name}/offset"]
    nodes.append(
        helper.make_node("MatMul", [sums, c_name], [f"{name}/offset"], name=f"{name}_offset")
    )
    if use_lora:
        lora_outs = [
            next(i for i in r[0].input if i != o) for r, o in zip(loras, outs, strict=True)
        ]
        if len(lora_outs) > 1:
            nodes.append(
                helper.make_node(
                    "Concat", lora_outs, [f"{name}/lora"], name=f"{name}/lora/Concat", axis=-1
                )
            )
            lora_outs = [f"{name}/lora"]
        terms += lora_outs
    # grid + offset (+ LoRA) in one node: each node costs more than its arithmetic here
    nodes.append(helper.make_node("Sum", terms, [y], name=f"{name}_add"))
    if len(members) > 1:
        gqa = next(
            (
                n
                for n in readers.get(finals[0], [])
                if n.op_type == "GroupQueryAttention" and list(n.input[:3]) == finals
            ),
            None,
        )
        if gqa is not None and all(len(readers.get(f, [])) == 1 for f in finals):
            gqa.input[0], gqa.input[1], gqa.input[2] = y, "", ""  # packed QKV
        else:
            split = numpy_helper.from_array(np.array(sizes, np.int64), f"{name}/split_sizes")
            graph.initializer.append(split)
            nodes.append(
                helper.make_node("Split", [y, split.name], finals, name=f"{name}/Split", axis=-1)
            )
    return nodes, gone


def _drop_unused_initializers(graph: Any) -> None:
    """Remove initializers no node reads (the per-projection weights merged away)."""
    used = {i for n in graph.node for i in n.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _fix_tied_embedding(graph: Any) -> None:
    """Point a tied embedding's GatherBlockQuantized at the lm_head's 8-bit weights.

    With `matmul_mixed_precision=last_matmul:int8` and tied embeddings, the builder (0.18) names
    the embedding's inputs `..._Q8G32`, `..._scale`, `..._zp`, which nothing produces; the
    lm_head's `..._Q8`, `..._scales` (and `..._zero_points`) hold the very same tensors.
    """
    from onnx import helper, numpy_helper

    inits = {i.name: i for i in graph.initializer}
    produced = (
        {o for n in graph.node for o in n.output} | set(inits) | {i.name for i in graph.input}
    )
    head = next((n for n in graph.node if n.name.startswith("/lm_head/MatMul_Q8")), None)
    if head is None:
        return
    by_producer = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type != "GatherBlockQuantized":
            continue
        data = by_producer.get(node.input[0])  # the Reshape of the shared weight
        if data is not None and data.op_type == "Reshape" and data.input[0] not in produced:
            data.input[0] = head.input[1]
        if len(node.input) > 2 and node.input[2] not in produced:
            node.input[2] = head.input[2]
        if len(node.input) > 3 and node.input[3] not in produced:
            if len(head.input) > 3:
                node.input[3] = head.input[3]
            else:  # symmetric 8-bit: the implicit zero point 128, written out
                dims = list(inits[head.input[2]].dims)
                name = f"{head.input[1]}_embed_zero_points"
                graph.initializer.append(
                    numpy_helper.from_array(np.full(dims, 128, np.uint8), name)
                )
                node.input[3] = name
        bits = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "bits"), 0)
        if bits != 8:
            log.warning("tied embedding %s has %d-bit weights; left as built", node.name, bits)


def _toposort(graph: Any) -> None:
    """Reorder `graph.node` so every node comes after the producers of its inputs."""
    produced = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for n in pending:
            if all(i in produced for i in n.input):
                ordered.append(n)
                produced.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input near {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)
