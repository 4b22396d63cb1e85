"""Export a compressed (or plain) model to ONNX with Optimum's I/O names; stock ONNX Runtime runs the result.

Encoders: input_ids, attention_mask[, token_type_ids] → last_hidden_state.
Decoders: input_ids, attention_mask, position_ids, past_key_values.{i}.key/value → logits, present.{i}.key/value;
the first call passes past tensors of length 0. Batch and sequence axes are dynamic, named as Optimum names them.
Image encoders (ViT): pixel_values (batch, channels, height, width at the processor's size) → last_hidden_state.
Encoder-decoders (T5, BART, Whisper) follow Optimum's split into two files: encoder_model.onnx (input_ids,
attention_mask, or Whisper's input_features → last_hidden_state) and decoder_model.onnx (input_ids,
encoder_attention_mask (not Whisper's), encoder_hidden_states, past_key_values.{i}.decoder.key/value → logits,
present.{i}.decoder.key/value; past of length 0 on the first call).
The decoder recomputes the cross-attention keys and values from encoder_hidden_states at every call, where
Optimum's decoder_with_past reads them from past_key_values.{i}.encoder.*: one graph instead of two copies of the
decoder's weights, at the cost of the cross-attention projections per step.

Floating initializers are stored at the compressed model's storage dtype and cast to float32 in the graph, so the
file is about as large as model.safetensors; compute is float32, as PyTorch runs the loaded model.
"""

from __future__ import annotations

import inspect
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import CompotError
from . import ops

ONNX_FILE = "model.onnx"
MIN_OPSET = 18  # BitwiseAnd and the function bodies need 18
TORCH_MAX_OPSET = 20  # the TorchScript exporter's ceiling
TWO_GB = 2**31


@dataclass
class IOSpec:
    """Names, dynamic axes and example values of the exported graph's inputs and outputs."""

    kind: str  # "encoder" | "decoder" | "image" | "seq2seq-decoder"
    inputs: list[str]
    outputs: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    n_layers: int = 0


def past_names(n_layers: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def present_names(n_layers: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def _encoder_base(model):
    return getattr(model, "base_model", model)


def encoder_wrapper(model, with_token_types: bool):
    """model as a module (input_ids, attention_mask[, token_type_ids]) → last_hidden_state."""
    import torch

    class EncoderIO(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = _encoder_base(model)

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kw = {"token_type_ids": token_type_ids} if with_token_types else {}
            return self.base(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state

    return EncoderIO()


def image_wrapper(model):
    """An image model as a module pixel_values → last_hidden_state."""
    import torch

    class ImageIO(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.base = _encoder_base(model)

        def forward(self, pixel_values):
            return self.base(pixel_values=pixel_values).last_hidden_state

    return ImageIO()


def image_shape(config) -> tuple[int, int, int]:
    """(channels, height, width) an image model takes."""
    size = config.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return config.num_channels, h, w


def seq2seq_encoder_wrapper(model, inputs: list[str]):
    """An encoder-decoder's encoder as a module (*inputs: input_ids, attention_mask or Whisper's input_features)
    → last_hidden_state."""
    import torch

    class Seq2SeqEncoderIO(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = model.get_encoder()

        def forward(self, *args):
            return self.encoder(**dict(zip(inputs, args, strict=True))).last_hidden_state

    return Seq2SeqEncoderIO()


def seq2seq_cache(past, n_layers: int):
    """An EncoderDecoderCache whose self-attention part holds `past` ([key, value] × n_layers, (B, heads, T, d))
    and whose cross-attention part is empty, so the model computes the encoder's keys and values."""
    from transformers import DynamicCache, EncoderDecoderCache

    self_attn = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n_layers)]) if past \
        else DynamicCache()
    return EncoderDecoderCache(self_attn, DynamicCache())


def self_attention_past(cache) -> list:
    """[key, value] × layers of an EncoderDecoderCache's self-attention part."""
    return [t for layer in cache.self_attention_cache.layers for t in (layer.keys, layer.values)]


def seq2seq_decoder_wrapper(model, n_layers: int, masked: bool):
    """An encoder-decoder as a decoder step (input_ids, [encoder_attention_mask,] encoder_hidden_states, *past) →
    (logits, *present): the self-attention cache goes through past/present, cross-attention is recomputed.
    Without `masked` (Whisper: every encoder position is real) there is no encoder_attention_mask."""
    import torch

    from ..models import cache_kwargs, output_cache

    class Seq2SeqDecoderIO(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, *rest):
            mask, hidden, past = (rest[0], rest[1], rest[2:]) if masked else (None, rest[0], rest[1:])
            out = self.model(decoder_input_ids=input_ids, attention_mask=mask, encoder_outputs=(hidden,),
                             use_cache=True, **cache_kwargs(self.model, seq2seq_cache(past, n_layers)))
            return (out.logits, *self_attention_past(output_cache(out)))

    return Seq2SeqDecoderIO()


def decoder_wrapper(model, n_layers: int):
    """A causal LM as a module (input_ids, attention_mask, position_ids, *past) → (logits, *present)."""
    import torch
    from transformers import DynamicCache

    from ..models import cache_kwargs, output_cache

    class DecoderIO(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            # Full (non-sliding) cache layers everywhere: a sliding layer's window bookkeeping is Python ints that
            # the tracer would freeze at the example's length; the sliding-window mask itself is traced from
            # positions, so sliding blocks stay exact past the window (their cache grows like a full one's).
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(n_layers)])
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=True, **cache_kwargs(self.model, cache))
            present = [t for layer in output_cache(out).layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return DecoderIO()


def accepts_token_types(model) -> bool:
    return "token_type_ids" in inspect.signature(_encoder_base(model).forward).parameters


def seq2seq_past_names(n_layers: int, prefix: str = "past_key_values") -> list[str]:
    return [f"{prefix}.{i}.decoder.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def _cache_axes(past: list[str], present: list[str], past_len: str, new_len: str) -> dict:
    """Dynamic axes of KV-cache tensors (batch, heads, length, head_dim): past of `past_len`, present one call
    longer."""
    return {**{p: {0: "batch_size", 2: past_len} for p in past},
            **{p: {0: "batch_size", 2: f"{past_len} + {new_len}"} for p in present}}


def io_spec(model) -> IOSpec:
    """The I/O of a one-graph export (encoders and decoders)."""
    from ..models import is_causal_lm

    if not is_causal_lm(model):
        ins = ["input_ids", "attention_mask"] + (["token_type_ids"] if accepts_token_types(model) else [])
        axes = {n: {0: "batch_size", 1: "sequence_length"} for n in ins + ["last_hidden_state"]}
        return IOSpec("encoder", ins, ["last_hidden_state"], axes)
    n = model.config.get_text_config().num_hidden_layers
    past, present = past_names(n), present_names(n)
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    axes.update(_cache_axes(past, present, "past_sequence_length", "sequence_length"))
    return IOSpec("decoder", ["input_ids", "attention_mask", "position_ids"] + past, ["logits"] + present, axes, n)


def seq2seq_specs(n_layers: int, speech: bool = False) -> tuple[IOSpec, IOSpec]:
    """Optimum's encoder_model / decoder_model I/O for an encoder-decoder with `n_layers` decoder blocks; a speech
    model's (Whisper) encoder takes input_features (its frame count fixed) and its decoder no encoder mask."""
    if speech:
        encoder = IOSpec("encoder", ["input_features"], ["last_hidden_state"],
                         {"input_features": {0: "batch_size"}, "last_hidden_state": {0: "batch_size"}})
    else:
        encoder = IOSpec("encoder", ["input_ids", "attention_mask"], ["last_hidden_state"],
                         {n: {0: "batch_size", 1: "encoder_sequence_length"}
                          for n in ("input_ids", "attention_mask", "last_hidden_state")})
    past, present = seq2seq_past_names(n_layers), seq2seq_past_names(n_layers, "present")
    axes = {"input_ids": {0: "batch_size", 1: "decoder_sequence_length"},
            "encoder_attention_mask": {0: "batch_size", 1: "encoder_sequence_length"},
            "encoder_hidden_states": {0: "batch_size", 1: "encoder_sequence_length"},
            "logits": {0: "batch_size", 1: "decoder_sequence_length"}}
    axes.update(_cache_axes(past, present, "past_decoder_sequence_length", "decoder_sequence_length"))
    mask = [] if speech else ["encoder_attention_mask"]
    if speech:
        del axes["encoder_attention_mask"]
        axes["encoder_hidden_states"] = {0: "batch_size"}
    decoder = IOSpec("seq2seq-decoder", ["input_ids", *mask, "encoder_hidden_states"] + past, ["logits"] + present,
                     axes, n_layers)
    return encoder, decoder


@dataclass
class Part:
    """One graph of an export: its file name, I/O, the module traced into it and the example it is traced on."""

    file: str
    spec: IOSpec
    module: object
    args: tuple


def export_parts(model) -> list[Part]:
    """The graphs `model` exports to: model.onnx for encoders, image encoders and decoders; encoder_model.onnx and
    decoder_model.onnx for an encoder-decoder. Examples: batch 2, the second row padded (encoders) or a
    3-token past and 4 new tokens (decoders; 2 past + 1 new token for an encoder-decoder's decoder)."""
    import torch

    from ..models import AUDIO, IMAGES, encoder_decoder, find_stacks, main_input, output_cache
    from ..runtimes.loader import DECODER_FILE, ENCODER_FILE  # the names the package's loader opens

    g = torch.Generator().manual_seed(0)
    if main_input(model.config) == IMAGES:
        axes = {"pixel_values": {0: "batch_size"}, "last_hidden_state": {0: "batch_size"}}
        spec = IOSpec("image", ["pixel_values"], ["last_hidden_state"], axes)
        pixels = torch.randn(2, *image_shape(model.config), generator=g)
        return [Part(ONNX_FILE, spec, image_wrapper(model).eval(), (pixels,))]
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(5, vocab, (2, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    if encoder_decoder(model) is not None:
        n = len(find_stacks(model)[1].blocks)
        speech = main_input(model.config) == AUDIO
        enc_spec, dec_spec = seq2seq_specs(n, speech)
        encoder = seq2seq_encoder_wrapper(model, enc_spec.inputs).eval()
        enc_args = (torch.randn(2, model.config.num_mel_bins, 2 * model.config.max_source_positions, generator=g),) \
            if speech else (ids, mask)
        with torch.no_grad():
            hidden = encoder(*enc_args)
            out = model(decoder_input_ids=torch.randint(5, vocab, (2, 2), generator=g),
                        attention_mask=None if speech else mask, encoder_outputs=(hidden,), use_cache=True)
        past = self_attention_past(output_cache(out))
        step = torch.randint(5, vocab, (2, 1), generator=g)
        dec_args = (step, hidden, *past) if speech else (step, mask, hidden, *past)
        return [Part(ENCODER_FILE, enc_spec, encoder, enc_args),
                Part(DECODER_FILE, dec_spec, seq2seq_decoder_wrapper(model, n, not speech).eval(), dec_args)]
    spec = io_spec(model)
    if spec.kind == "encoder":
        args = (ids, mask) + ((torch.zeros_like(ids),) if "token_type_ids" in spec.inputs else ())
        return [Part(ONNX_FILE, spec, encoder_wrapper(model, "token_type_ids" in spec.inputs).eval(), args)]
    with torch.no_grad():
        prefix = torch.randint(5, vocab, (2, 3), generator=g)
        out = model(input_ids=prefix, use_cache=True)
    past = [t for layer in output_cache(out).layers for t in (layer.keys, layer.values)]
    new = torch.randint(5, vocab, (2, 4), generator=g)
    pos = torch.arange(3, 7).expand(2, 4).contiguous()
    args = (new, torch.ones(2, 7, dtype=torch.long), pos, *past)
    return [Part(ONNX_FILE, spec, decoder_wrapper(model, spec.n_layers).eval(), args)]


def graph_files(graph: dict) -> list[str]:
    """The .onnx files of an export manifest's `graph` (one, or an encoder-decoder's two)."""
    return graph.get("files", [ONNX_FILE])


# ---------------------------------------------------------------------------------------------- graph post-pass


def _store_initializers(model_proto, storage_dtype: str) -> int:
    """Keep float32 initializers at `storage_dtype` where that is lossless, cast back to float32 in the graph.

    Returns the number of initializers converted.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    if storage_dtype == "float32":
        return 0
    if storage_dtype == "float16":
        np_dt = np.float16
    else:
        import ml_dtypes

        np_dt = ml_dtypes.bfloat16
    graph = model_proto.graph
    casts, n = [], 0
    for init in graph.initializer:
        if init.data_type != onnx.TensorProto.FLOAT:
            continue
        arr = numpy_helper.to_array(init)
        low = arr.astype(np_dt)
        if arr.size < 2 or not np.array_equal(low.astype(np.float32), arr):
            continue
        name = init.name
        stored = f"{name}.stored"
        init.CopyFrom(numpy_helper.from_array(low, stored))
        casts.append(helper.make_node("Cast", [stored], [name], to=onnx.TensorProto.FLOAT, name=f"cast_{name}"))
        n += 1
    for node in reversed(casts):
        graph.node.insert(0, node)
    return n


# (op, input) pairs that read a stored-dtype tensor as well as its float32 cast: Gather's table (the rows are cast
# after gathering) and SparseCodesMatMul's values (its body scatters them at their own dtype and widens C once;
# ORT's CPU EP has no bfloat16 Expand/ScatterElements, so bfloat16 values keep their cast)
_READS_STORED = {"float16": {("Gather", 0), ("SparseCodesMatMul", 1)}, "bfloat16": {("Gather", 0)}}


def _narrow_reads(model_proto, storage_dtype: str) -> int:
    """Where every reader of a storage cast is in _READS_STORED[storage_dtype], let it read the stored tensor and
    drop the cast: the stored tensor is then never widened whole to float32 at session start (an embedding table
    stays at the storage dtype in memory; the sparse codes' values add no folded float32 copy). Returns the casts
    dropped."""
    from onnx import helper

    graph = model_proto.graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    drop = []
    for cast in list(graph.node):
        if cast.op_type != "Cast" or not cast.name.startswith("cast_"):
            continue
        users = consumers.get(cast.output[0], [])
        if not users or any((n.op_type, i) not in _READS_STORED.get(storage_dtype, set()) for n, i in users):
            continue
        for node, i in users:
            node.input[i] = cast.input[0]
            if node.op_type == "Gather":
                out = node.output[0]
                node.output[0] = out + ".stored"
                graph.node.insert(list(graph.node).index(node) + 1,
                                  helper.make_node("Cast", [out + ".stored"], [out], to=cast.attribute[0].i,
                                                   name=f"{cast.name}_rows"))
        drop.append(cast)
    for cast in drop:
        graph.node.remove(cast)
    return len(drop)


def _dedupe_initializers(model_proto) -> int:
    """Store a tensor once when the exporter wrote it twice: as is, transposed (a tied LM head next to its
    embedding), or the same bytes in another shape (a packed table read as GatherBlockQuantized's 2-D data and as
    MatMulNBits' 3-D B). The copy becomes an Identity/Transpose/Reshape node of the original. Returns the number
    removed."""
    import hashlib

    import numpy as np
    from onnx import helper, numpy_helper

    graph = model_proto.graph
    seen: dict[tuple, str] = {}
    flat: dict[tuple, str] = {}
    keep, nodes = [], []
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        digest = hashlib.sha1(np.ascontiguousarray(arr).tobytes()).hexdigest()
        key = (arr.dtype.str, arr.shape, digest)
        orig = seen.get(key)
        if orig is not None:
            nodes.append(helper.make_node("Identity", [orig], [init.name], name=f"dedup_{init.name}"))
            continue
        orig = flat.get((arr.dtype.str, digest)) if arr.size >= 1024 else None
        if orig is not None:
            keep.append(numpy_helper.from_array(np.asarray(arr.shape, np.int64), f"{init.name}.shape"))
            nodes.append(helper.make_node("Reshape", [orig, f"{init.name}.shape"], [init.name],
                                          name=f"dedup_{init.name}"))
            continue
        flat[(arr.dtype.str, digest)] = init.name
        if arr.ndim == 2 and arr.size >= 1024:
            tkey = (arr.dtype.str, arr.shape[::-1], hashlib.sha1(np.ascontiguousarray(arr.T).tobytes()).hexdigest())
            orig = seen.get(tkey)
            if orig is not None:
                nodes.append(helper.make_node("Transpose", [orig], [init.name], perm=[1, 0], name=f"dedup_{init.name}"))
                continue
        seen[key] = init.name
        keep.append(init)
    if nodes:
        del graph.initializer[:]
        graph.initializer.extend(keep)
        for node in reversed(nodes):
            graph.node.insert(0, node)
    return len(nodes)


def _used_ops(model_proto) -> set[tuple[str, str]]:
    return {(n.domain, n.op_type) for n in model_proto.graph.node}


def _add_functions(model_proto, body: str, opset: int) -> list[str]:
    """Append the `ai.compot` functions the graph calls (the body's opset = the model's); return their names."""
    from onnx import helper

    used = {op for dom, op in _used_ops(model_proto) if dom == ops.DOMAIN}
    fns = ops.functions(body, opset)
    unknown = used - set(fns)
    if unknown:
        raise CompotError(f"graph uses unknown {ops.DOMAIN} ops: {sorted(unknown)}")
    names = sorted(used)
    for name in names:
        model_proto.functions.append(fns[name])
    domains = {o.domain for o in model_proto.opset_import}
    if names and ops.DOMAIN not in domains:
        model_proto.opset_import.append(helper.make_opsetid(ops.DOMAIN, ops.DOMAIN_VERSION))
    if any(d == "com.microsoft" for d, _ in _used_ops(model_proto)) and "com.microsoft" not in domains:
        model_proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return names


def save_onnx(model_proto, path: Path) -> None:
    """Write `path`; tensors go to `path.data` when the whole model would pass protobuf's 2 GB limit."""
    import onnx

    if model_proto.ByteSize() >= TWO_GB - 2**20:
        onnx.save_model(model_proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model_proto, str(path))


def check_onnx(path: Path) -> None:
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise CompotError(f"exported graph fails onnx.checker: {str(e).splitlines()[0]}") from None


# ------------------------------------------------------------------------------------------ runtime capability

_SUPPORT: dict[tuple[int, int], str | None] = {}


def ort_support_error(opset: int, ir_version: int) -> str | None:
    """None if the installed onnxruntime loads a model of this opset and IR version, else its complaint."""
    key = (opset, ir_version)
    if key not in _SUPPORT:
        import onnx
        from onnx import TensorProto, helper

        from ..runtimes.loader import open_session

        g = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
        try:
            open_session(m.SerializeToString())
            _SUPPORT[key] = None
        except Exception as e:  # noqa: BLE001 - ORT raises several exception types for this
            _SUPPORT[key] = str(e).splitlines()[0][:200]
        del onnx
    return _SUPPORT[key]


def check_opset(opset: int) -> None:
    import onnxruntime as ort

    if not MIN_OPSET <= opset <= TORCH_MAX_OPSET:
        raise CompotError(f"--opset must be in [{MIN_OPSET}, {TORCH_MAX_OPSET}], got {opset}")
    err = ort_support_error(opset, 8)
    if err:
        raise CompotError(f"onnxruntime {ort.__version__} cannot run opset {opset}: {err}")


# ------------------------------------------------------------------------------------------------------ export


def _trace(part: Part, path: Path, model, opset: int, fold: bool) -> object:
    """torch.onnx.export of one part into `path`'s folder; returns the loaded ModelProto."""
    import warnings

    import onnx
    import torch

    from .torch_ops import export_forwards

    spec = part.spec
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with export_forwards(model, fold) as n_compressed, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(part.module, part.args, str(raw), dynamo=False, opset_version=opset,
                              input_names=spec.inputs, output_names=spec.outputs, dynamic_axes=spec.dynamic_axes,
                              custom_opsets={ops.DOMAIN: ops.DOMAIN_VERSION} if n_compressed else None,
                              do_constant_folding=True)
        return onnx.load(str(raw))


def _finish(proto, kind: str, opset: int, body: str, storage_dtype: str) -> dict:
    """Our functions, deduplicated and narrowed initializers, metadata. Returns what the graph holds."""
    fn_names = _add_functions(proto, body, opset)
    n_dup = _dedupe_initializers(proto)
    n_low = _store_initializers(proto, storage_dtype)
    _narrow_reads(proto, storage_dtype)
    proto.ir_version = max(proto.ir_version, 8)
    proto.producer_name, proto.producer_version = "compot-deploy", _version()
    meta = {"compot.sparse_body": body, "compot.kind": kind, "compot.storage_dtype": storage_dtype}
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    return {"functions": fn_names, "ops": sorted(f"{d or 'ai.onnx'}::{o}" for d, o in _used_ops(proto)),
            "initializers_at_storage_dtype": n_low, "initializers_deduplicated": n_dup, "ir_version": proto.ir_version}


SHARED_DATA = "shared_weights.onnx.data"  # tensors two graphs of one export both hold, stored once
SHARE_MIN_BYTES = 2**20


def _share_initializers(protos, path: Path) -> int:
    """Store once, in the external data file `path`, every initializer of at least SHARE_MIN_BYTES that several
    graphs hold with equal dtype, shape and bytes (an encoder-decoder's embedding table, read by both graphs); each
    graph points at the one copy (ONNX external data: location, offset, length). Returns the bytes written."""
    import hashlib

    import onnx
    from onnx import external_data_helper, numpy_helper

    def raw(init) -> bytes:
        return init.raw_data if init.HasField("raw_data") else numpy_helper.to_array(init).tobytes()

    holders: dict[tuple, list] = {}
    for proto in protos:
        for init in proto.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                continue
            data = raw(init)
            if len(data) >= SHARE_MIN_BYTES:
                key = (init.data_type, tuple(init.dims), hashlib.sha1(data).hexdigest())
                holders.setdefault(key, []).append((proto, init))
    offset = 0
    with open(path, "wb") as f:
        for inits in holders.values():
            if len({id(p) for p, _ in inits}) < 2:
                continue
            data = raw(inits[0][1])
            offset = -(-offset // 65536) * 65536  # 64 KiB aligned, so ORT may map it rather than copy
            f.seek(offset)
            f.write(data)
            for _, init in inits:
                external_data_helper.set_external_data(init, path.name, offset, len(data))
                init.data_location = onnx.TensorProto.EXTERNAL
                init.ClearField("raw_data")
            offset += len(data)
    if offset == 0:
        path.unlink()
    return offset


def export_model(model, folder: Path, *, opset: int = MIN_OPSET, body: str = "folded",
                 storage_dtype: str = "float16") -> dict:
    """Trace `model` (float32, eval) into `folder` (model.onnx, or encoder_model.onnx + decoder_model.onnx) with
    our ops; return a description of the graphs written (an encoder-decoder's: kind "seq2seq", the encoder's
    inputs, the decoder's outputs, each graph's own description under "parts")."""
    check_opset(opset)
    attn = model.config._attn_implementation
    model.set_attn_implementation("eager")  # no data-dependent SDPA shortcuts baked into the trace
    parts = export_parts(model)
    fold = body == "folded"  # the other bodies exist to keep C out of memory
    described, protos = [], []
    try:
        for part in parts:
            protos.append(_trace(part, folder / part.file, model, opset, fold))
            described.append({"file": part.file, "kind": part.spec.kind, "inputs": part.spec.inputs,
                              "outputs": part.spec.outputs, "dynamic_axes": part.spec.dynamic_axes,
                              "n_layers": part.spec.n_layers,
                              **_finish(protos[-1], part.spec.kind, opset, body, storage_dtype)})
    finally:
        model.set_attn_implementation(attn)
        model.eval()
    shared = _share_initializers(protos, folder / SHARED_DATA) if len(protos) > 1 else 0
    for part, proto in zip(parts, protos, strict=True):
        save_onnx(proto, folder / part.file)
        check_onnx(folder / part.file)
    del protos
    common = {"opset": opset, "sparse_body": body, "storage_dtype": storage_dtype, "files": [p.file for p in parts]}
    if shared:
        common["shared_data"] = {"file": SHARED_DATA, "bytes": shared}
    if len(described) == 1:
        return {**described[0], **common}
    enc, dec = described
    return {"kind": "seq2seq", "file": dec["file"], "inputs": enc["inputs"], "outputs": dec["outputs"],
            "n_layers": dec["n_layers"], "ir_version": max(enc["ir_version"], dec["ir_version"]),
            "functions": sorted(set(enc["functions"]) | set(dec["functions"])),
            "ops": sorted(set(enc["ops"]) | set(dec["ops"])),
            "initializers_at_storage_dtype": enc["initializers_at_storage_dtype"] + dec["initializers_at_storage_dtype"],
            "initializers_deduplicated": enc["initializers_deduplicated"] + dec["initializers_deduplicated"],
            "parts": {"encoder": enc, "decoder": dec}, **common}


def _version() -> str:
    from ..version import __version__

    return __version__


# ------------------------------------------------------------------------------------------------ the folder

MANIFEST = "export.json"


def _file_dtype(model_dir: Path) -> str:
    """The floating dtype a plain model folder stores its weights in (float32 unless every float tensor is
    float16 or bfloat16), so a half-precision checkpoint exports at half the bytes, losslessly."""
    from ..storage.artifact import safetensors_header

    kinds = set()
    for f in model_dir.glob("*.safetensors"):
        kinds |= {v["dtype"] for v in safetensors_header(f).values() if v["dtype"] in ("F32", "F16", "BF16")}
    return {frozenset({"F16"}): "float16", frozenset({"BF16"}): "bfloat16"}.get(frozenset(kinds), "float32")


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise CompotError(f"{folder} is not an export folder (no {MANIFEST}); write one with `compot-deploy export`")
    return json.loads(path.read_text())


def export_dir(source: str | Path, out: str | Path, cfg, overwrite: bool = False) -> dict:
    """Export the model folder `source` (written by compress/quantize, or a plain HF model) into the folder `out`:
    model.onnx (or encoder_model.onnx + decoder_model.onnx), config.json, tokenizer files and export.json (the manifest). Atomic. Returns the manifest."""
    import shutil

    import onnxruntime as ort
    import torch

    from ..storage.artifact import atomic_dir, check_output_dir, load, write_json_atomic
    from ..storage.shards import weights_bytes
    from ..gguf import gguf_file
    from ..models import check_supported_dir, load_model, load_tokenizer, read_hf_config, resolve_model_dir

    check_opset(cfg.opset)
    if gguf_file(source) is None:
        check_supported_dir(source)  # a bad input is named before anything about the output
    check_output_dir(out, overwrite, [source])
    source = resolve_model_dir(source).resolve()
    section = read_hf_config(source).get("compot")
    model = load(source) if section else load_model(source)[0]
    tokenizer = load_tokenizer(source)
    storage = section["storage_dtype"] if section else _file_dtype(source)
    with atomic_dir(out, overwrite) as tmp:
        graph = export_model(model, tmp, opset=cfg.opset, body=cfg.sparse_body, storage_dtype=storage)
        shutil.copy(source / "config.json", tmp / "config.json")
        tokenizer.save_pretrained(tmp)
        st = weights_bytes(source) or None  # every shard; None for a folder without safetensors
        onnx_size = sum(p.stat().st_size for p in tmp.glob("*.onnx*"))
        manifest = {
            "format": "compot-deploy-onnx", "format_version": 1, "source": str(source), "graph": graph,
            "bytes": {"onnx": onnx_size, "safetensors": st, "onnx_over_safetensors": onnx_size / st if st else None},
            "versions": {"compot-deploy": _version(), "torch": torch.__version__, "onnxruntime": ort.__version__},
            "config": cfg.model_dump(mode="json"), "validation": None,
        }
        write_json_atomic(tmp / MANIFEST, manifest)
    return manifest
