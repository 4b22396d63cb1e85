"""The `ai.compot` operator domain: each op is an ONNX function with a standard-op body (METHOD §7).

Stock ONNX Runtime inlines a model's local functions at load, so a model using these ops needs no custom-op
library. Ops (version 1 of the domain):

SparseCodesMatMul(z, values, indices; k) -> y
    z: T (..., k) · values: V (s, d_out) (the storage dtype; read as is, no float32 copy) · indices: int32/int64/
    uint8/uint16 (s, d_out), the row of C holding values[t, j] · attribute k: rows of C → y: T (..., d_out),
    y[..., j] = Σ_t z[..., indices[t, j]] · values[t, j], i.e. y = z C for the column-sparse C (k, d_out). The body
    is fixed when the model is written (`--sparse-body`):
      "folded": ScatterElements into a (k, d_out) block whose shape is constant, then MatMul. Every input is an
                initializer, so ONNX Runtime builds the dense C once, at session start (float32, k·d_out).
      "dense":  the same scatter, but the block's shape is read from z at run time: C is rebuilt on every call
                and never held between calls.
      "gather": Gather the s inputs each output reads, multiply, reduce: O(n·s·d_out) work, no k·d_out block.
    Measured on ONNX Runtime's CPU EP (MiniLM, ratio 0.3, benchmarks/results/sparse_body.md): folded is the
    fastest at every batch × sequence shape, so it is the default; the Gather/ReduceSum kernels make "gather"
    several times slower even at one token.
SparseCodesExtraMatMul(z, values, indices, extra_values, extra_rows, extra_cols; k) -> y
    SparseCodesMatMul plus ROCKET's re-activated codes: extra_values: V (e,) at rows extra_rows and columns
    extra_cols (uint8/uint16/int32, (e,)) of C, none on the fixed-s support; written into the same scattered block
    (ScatterND), so the "folded" body folds them at load too ("gather" builds the block per call, as "dense").
ColumnMaskToIndices(planes; s) -> indices
    planes: uint8 (B, d_out), B = ⌈k/8⌉, the column bitmask in bit planes: row r of C is bit r // B of byte
    [r % B, j] (`torch_ops.bit_planes` writes it from the stored mask; same bytes) · attribute s: the non-zeros
    of every column → indices: int64 (s, d_out), ascending within a column. Its input is an initializer, so
    ONNX Runtime folds it once at session start; the plane layout makes the unpacked bits come out as (8B, d_out)
    rows directly, with no transpose.
DequantizeBlocks(qweight, scales, zeros) -> M  and  DequantizeBlocksSym(qweight, scales) -> M
    The packed layout of ORT's MatMulNBits (quantize/packing.py): qweight uint8 (N, n_blocks, blob), scales T
    (N, n_blocks), zeros uint8 (N, ⌈n_blocks·bits/8⌉), or 2^(bits−1) for the Sym op. Attributes bits (2, 3, 4, 8),
    group (rows per block), K (rows of M). → M: T (K, N). Used for quantized code values (one block per column)
    and for any quantized matrix MatMulNBits cannot take (block size not a power of two ≥ 16).
"""

from __future__ import annotations

import onnx
from onnx import TensorProto
from onnx import helper as h

DOMAIN = "ai.compot"
DOMAIN_VERSION = 1
BODIES = ("folded", "dense", "gather")


def _c(name: str, values, dtype=TensorProto.INT64):
    return h.make_node("Constant", [], [name], value=h.make_tensor(name, dtype, [len(values)], values))


def _gather_body(z: str, values: str, idx: str, y: str) -> list:
    return [
        h.make_node("Gather", [z, idx], ["zg"], axis=-1),  # (..., s, d_out)
        h.make_node("CastLike", [values, z], ["valuesT"]),
        h.make_node("Mul", ["zg", "valuesT"], ["prod"]),
        _c("axis", [-2]),
        h.make_node("ReduceSum", ["prod", "axis"], [y], keepdims=0),
    ]


def _scatter_body(z: str, values: str, idx: str, y: str, k_from: str, extra: bool = False) -> list:
    """C = the codes scattered into zeros (k, d_out) at the values' dtype, widened to z's, then y = z C. k_from
    "input": k read from z at run time (C rebuilt per call); "attribute": k from the op's attribute, every input
    constant, so ORT folds C at load. extra: the inputs extra_values/extra_rows/extra_cols (coordinate codes) are
    written into C too (ScatterND at (row, col) pairs)."""
    if k_from == "input":
        k_nodes = [h.make_node("Shape", [z], ["zshape"]), _c("last", [-1]),
                   h.make_node("Gather", ["zshape", "last"], ["k"], axis=0)]
    else:
        k_nodes = [_attr_scalar("k_s", "k"), _c("axis0", [0]), h.make_node("Unsqueeze", ["k_s", "axis0"], ["k"])]
    return k_nodes + [
        h.make_node("Shape", [values], ["vshape"]),
        _c("one", [1]),
        h.make_node("Gather", ["vshape", "one"], ["dout"], axis=0),
        h.make_node("Concat", ["k", "dout"], ["cshape"], axis=0),
        h.make_node("Constant", [], ["zero"], value=h.make_tensor("zero", TensorProto.FLOAT, [], [0.0])),
        h.make_node("CastLike", ["zero", values], ["zeroT"]),
        h.make_node("Expand", ["zeroT", "cshape"], ["zeros"]),
        h.make_node("ScatterElements", ["zeros", idx, values], ["Cs" if extra else "Cv"], axis=0),
    ] + (_coordinate_nodes("Cs", "Cv") if extra else []) + [
        h.make_node("CastLike", ["Cv", z], ["C"]),
        h.make_node("MatMul", [z, "C"], [y]),
    ]


def _coordinate_nodes(C: str, out: str) -> list:
    """out = C with extra_values written at (extra_rows[i], extra_cols[i])."""
    return [
        h.make_node("Cast", ["extra_rows"], ["er64"], to=TensorProto.INT64),
        h.make_node("Cast", ["extra_cols"], ["ec64"], to=TensorProto.INT64),
        _c("lastaxis", [-1]),
        h.make_node("Unsqueeze", ["er64", "lastaxis"], ["er2"]),
        h.make_node("Unsqueeze", ["ec64", "lastaxis"], ["ec2"]),
        h.make_node("Concat", ["er2", "ec2"], ["pairs"], axis=-1),  # (e, 2)
        h.make_node("ScatterND", [C, "pairs", "extra_values"], [out]),
    ]


def sparse_codes_extra_matmul(body: str) -> onnx.FunctionProto:
    """SparseCodesExtraMatMul(z, values, indices, extra_values, extra_rows, extra_cols; k) -> y: SparseCodesMatMul
    with ROCKET's re-activated codes (coordinate form) added to C. The "gather" body builds C per call as "dense"
    does (a coordinate list has no fixed count per column to gather by)."""
    if body not in BODIES:
        raise ValueError(f"body must be one of {BODIES}, got {body!r}")
    nodes = [h.make_node("Cast", ["indices"], ["idx"], to=TensorProto.INT64)]
    nodes += _scatter_body("z", "values", "idx", "y", "attribute" if body == "folded" else "input", extra=True)
    return h.make_function(DOMAIN, "SparseCodesExtraMatMul",
                           ["z", "values", "indices", "extra_values", "extra_rows", "extra_cols"], ["y"], nodes,
                           opset_imports=[h.make_opsetid("", 18)], attributes=["k"], doc_string=f"body={body}")


def sparse_codes_matmul(body: str) -> onnx.FunctionProto:
    if body not in BODIES:
        raise ValueError(f"body must be one of {BODIES}, got {body!r}")
    # int64 indices pass through (ORT drops a Cast to the same type before folding); stored lists widen
    nodes = [h.make_node("Cast", ["indices"], ["idx"], to=TensorProto.INT64)]
    if body == "folded":
        nodes += _scatter_body("z", "values", "idx", "y", k_from="attribute")
    elif body == "gather":
        nodes += _gather_body("z", "values", "idx", "y")
    else:
        nodes += _scatter_body("z", "values", "idx", "y", k_from="input")
    return h.make_function(DOMAIN, "SparseCodesMatMul", ["z", "values", "indices"], ["y"], nodes,
                           opset_imports=[h.make_opsetid("", 18)], attributes=["k"], doc_string=f"body={body}")


def _scalar(name: str, value: int):
    return h.make_node("Constant", [], [name], value=h.make_tensor(name, TensorProto.INT64, [], [value]))


def column_mask_to_indices() -> onnx.FunctionProto:
    # Every node of a folded chain stays in memory until ORT's constant folding ends (benchmarks/fold_peak.py), so
    # the chain is short and narrow: an (8, 256) uint8 table unpacks the planes to (8, B, d_out) bits, one reshape
    # makes them C's rows, and TopK, which breaks ties by the lower index (ONNX spec), lists each column's set
    # rows in ascending order.
    lut = [(v >> i) & 1 for i in range(8) for v in range(256)]
    nodes = [
        h.make_node("Constant", [], ["lut"], value=h.make_tensor("lut", TensorProto.UINT8, [8, 256], lut)),
        _attr_scalar("s_s", "s"),
        _c("zero", [0]),
        _c("one", [1]),
        _c("two", [2]),
        _c("minus1", [-1]),
        h.make_node("Unsqueeze", ["s_s", "zero"], ["s"]),
        h.make_node("Cast", ["planes"], ["planes32"], to=TensorProto.INT32),  # Gather takes int32/int64 indices
        h.make_node("Gather", ["lut", "planes32"], ["bits3"], axis=1),  # (8, B, d_out)
        h.make_node("Shape", ["planes"], ["pshape"]),
        h.make_node("Slice", ["pshape", "one", "two"], ["dout"]),
        h.make_node("Concat", ["minus1", "dout"], ["rows_shape"], axis=0),
        h.make_node("Reshape", ["bits3", "rows_shape"], ["bits"]),  # (8B, d_out): row r = plane r // B, byte r % B
        h.make_node("TopK", ["bits", "s"], ["_", "indices"], axis=0, largest=1, sorted=1),
    ]
    return h.make_function(DOMAIN, "ColumnMaskToIndices", ["planes"], ["indices"], nodes,
                           opset_imports=[h.make_opsetid("", 18)], attributes=["s"])


def _attr_scalar(name: str, attr: str) -> onnx.NodeProto:
    """Constant int64 scalar `name` = the calling node's int attribute `attr`."""
    node = h.make_node("Constant", [], [name])
    a = onnx.AttributeProto()
    a.name, a.ref_attr_name, a.type = "value_int", attr, onnx.AttributeProto.INT
    node.attribute.append(a)
    return node


def _byte_unpack_nodes(src: str, out: str) -> list:
    """Nodes reading src: uint8 (..., B) packed at a width `bits` dividing 8 as out: uint8 (..., B·8/bits) codes:
    each byte shifted right by 0, bits, 2·bits, … and masked (uint8 throughout: few, small folded tensors)."""
    p = f"{out}_"
    return [
        h.make_node("Range", ["zero_s", "eight_s", "bits"], [p + "shifts64"]),  # 0, bits, 2·bits, … < 8
        h.make_node("Cast", [p + "shifts64"], [p + "shifts"], to=TensorProto.UINT8),
        h.make_node("Sub", ["levels", "one_s"], [p + "maskv"]),
        h.make_node("Cast", [p + "maskv"], [p + "mask8"], to=TensorProto.UINT8),
        h.make_node("Unsqueeze", [src, "minus1"], [p + "u"]),
        h.make_node("BitShift", [p + "u", p + "shifts"], [p + "sh"], direction="RIGHT"),
        h.make_node("BitwiseAnd", [p + "sh", p + "mask8"], [p + "m"]),
        h.make_node("Shape", [src], [p + "shape"]),
        h.make_node("Slice", [p + "shape", "zero", "minus1"], [p + "lead"]),
        h.make_node("Concat", [p + "lead", "minus1"], [p + "flat"], axis=0),
        h.make_node("Reshape", [p + "m", p + "flat"], [out]),
    ]


def _unpack_nodes(src: str, out: str) -> list:
    """Nodes reading the bit stream src: uint8 (..., B) as out: int32 (..., ⌊8B/bits⌋) codes (the `bits` attribute;
    packing.pack_bits' layout). Element e sits at stream bit e·bits, so inside the 16-bit window of bytes
    e·bits//8 and the one after it, shifted by e·bits % 8: any width 1–8 reads the same way."""
    p = f"{out}_"
    return [
        h.make_node("Cast", [src], [p + "i"], to=TensorProto.INT32),
        h.make_node("Pad", [p + "i", "pad_tail", "", "minus1"], [p + "padded"]),  # one zero byte past the end
        h.make_node("Shape", [src], [p + "shape"]),
        h.make_node("Gather", [p + "shape", "minus1"], [p + "B"], axis=0),
        h.make_node("Mul", [p + "B", "eight"], [p + "nbits"]),
        h.make_node("Div", [p + "nbits", "bits1"], [p + "n"]),
        h.make_node("Squeeze", [p + "n"], [p + "n_s"]),
        h.make_node("Range", ["zero_s", p + "n_s", "one_s"], [p + "e"]),
        h.make_node("Mul", [p + "e", "bits"], [p + "pos"]),
        h.make_node("Div", [p + "pos", "eight_s"], [p + "b0"]),
        h.make_node("Add", [p + "b0", "one_s"], [p + "b1"]),
        h.make_node("Mod", [p + "pos", "eight_s"], [p + "off"]),
        h.make_node("Pow", ["two_s", p + "off"], [p + "div64"]),
        h.make_node("Cast", [p + "div64"], [p + "div"], to=TensorProto.INT32),
        h.make_node("Gather", [p + "padded", p + "b0"], [p + "lo"], axis=-1),
        h.make_node("Gather", [p + "padded", p + "b1"], [p + "hi"], axis=-1),
        h.make_node("Mul", [p + "hi", "c256"], [p + "hi8"]),
        h.make_node("Add", [p + "lo", p + "hi8"], [p + "pair"]),
        h.make_node("Div", [p + "pair", p + "div"], [p + "shifted"]),
        h.make_node("Mod", [p + "shifted", "levels32"], [out]),
    ]


def dequantize_blocks(sym: bool, any_width: bool = False) -> onnx.FunctionProto:
    """DequantizeBlocks[Sym] (widths dividing 8, uint8 unpacking) or DequantizeBlocksAnyWidth[Sym] (the 16-bit
    window, any width; its folded intermediates are int32, so it is used only where the first cannot be)."""
    unpack = _unpack_nodes if any_width else _byte_unpack_nodes
    nodes = [
        _attr_scalar("bits", "bits"),
        _attr_scalar("group_s", "group"),
        _attr_scalar("K_s", "K"),
        _c("zero", [0]),
        _c("one", [1]),
        _c("two", [2]),
        _c("minus1", [-1]),
        _scalar("zero_s", 0),
        _scalar("one_s", 1),
        _scalar("two_s", 2),
        _scalar("eight_s", 8),
        h.make_node("Unsqueeze", ["group_s", "zero"], ["group"]),
        h.make_node("Unsqueeze", ["K_s", "zero"], ["K"]),
        h.make_node("Pow", ["two_s", "bits"], ["levels"]),
    ]
    if any_width:  # what the 16-bit window reads with
        nodes += [
            _c("eight", [8]),
            _c("pad_tail", [0, 1]),
            h.make_node("Constant", [], ["c256"], value=h.make_tensor("c256", TensorProto.INT32, [], [256])),
            h.make_node("Unsqueeze", ["bits", "zero"], ["bits1"]),
            h.make_node("Cast", ["levels"], ["levels32"], to=TensorProto.INT32),
        ]
    nodes += [
        # codes: (N, nb, blob) → (N, nb, block_len) → [..., :group]
        *unpack("qweight", "codes_all"),
        h.make_node("Shape", ["qweight"], ["qshape"]),
        h.make_node("Slice", ["codes_all", "zero", "group", "minus1"], ["codes"]),
        h.make_node("CastLike", ["codes", "scales"], ["codesT"]),
    ]
    if sym:
        nodes += [
            h.make_node("Sub", ["bits", "one_s"], ["bm1"]),
            h.make_node("Pow", ["two_s", "bm1"], ["zp_i"]),
            h.make_node("CastLike", ["zp_i", "scales"], ["zp"]),
        ]
    else:
        nodes += [
            *unpack("zeros", "zall"),
            h.make_node("Slice", ["qshape", "one", "two"], ["nb"]),
            h.make_node("Slice", ["zall", "zero", "nb", "one"], ["zcut"]),  # (N, nb)
            h.make_node("Unsqueeze", ["zcut", "minus1"], ["zcut3"]),
            h.make_node("CastLike", ["zcut3", "scales"], ["zp"]),
        ]
    nodes += [
        h.make_node("Sub", ["codesT", "zp"], ["centered"]),
        h.make_node("Unsqueeze", ["scales", "minus1"], ["sc3"]),
        h.make_node("Mul", ["centered", "sc3"], ["deq"]),  # (N, nb, group)
        h.make_node("Slice", ["qshape", "zero", "one"], ["n_dim2"]),
        h.make_node("Concat", ["n_dim2", "minus1"], ["flat"], axis=0),
        h.make_node("Reshape", ["deq", "flat"], ["rows"]),  # (N, nb·group)
        h.make_node("Slice", ["rows", "zero", "K", "one"], ["cut"]),
        h.make_node("Transpose", ["cut"], ["M"], perm=[1, 0]),
    ]
    name = "DequantizeBlocks" + ("AnyWidth" if any_width else "") + ("Sym" if sym else "")
    inputs = ["qweight", "scales"] + ([] if sym else ["zeros"])
    return h.make_function(DOMAIN, name, inputs, ["M"], nodes, opset_imports=[h.make_opsetid("", 18)],
                           attributes=["bits", "group", "K"])


def functions(body: str, opset: int = 18) -> dict[str, onnx.FunctionProto]:
    """Every op of the domain, by name, with the chosen SparseCodesMatMul body; bodies import the model's opset."""
    fs = [sparse_codes_matmul(body), sparse_codes_extra_matmul(body), column_mask_to_indices(), dequantize_blocks(False), dequantize_blocks(True),
          dequantize_blocks(False, True), dequantize_blocks(True, True)]
    for f in fs:
        del f.opset_import[:]
        f.opset_import.append(h.make_opsetid("", opset))
    return {f.name: f for f in fs}
