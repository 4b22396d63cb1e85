"""The token embedding table stored quantized (`--embedding-bits`): round-to-nearest, symmetric, in blocks along
the hidden size; a QuantEmbedding in PyTorch, com.microsoft::GatherBlockQuantized in ONNX Runtime.

An embedding lookup has no input activations to weigh errors by (each row is read as stored), so GPTQ has nothing
to add over round-to-nearest for it. A table tied to the LM head (Gemma, GPT-2) stays tied: the head becomes a
TiedQuantHead over the same packed bytes (MatMulNBits in ONNX Runtime), stored once; there the head's inputs (the
final hidden states) do weigh the errors, so `method="gptq"` rounds Eᵀ by GPTQ on the Gram of the head's inputs.
"""

from __future__ import annotations

from ..errors import CompotError


def input_embedding(model):
    """(qualified name, module) of the model's token embedding table."""
    emb = model.get_input_embeddings()
    for name, mod in model.named_modules():
        if mod is emb:
            return name, emb
    raise CompotError("cannot find the token embedding module")


def embed_scale(mod) -> float | None:
    """The constant factor an embedding module applies to its rows (Gemma's √H), or None."""
    s = getattr(mod, "embed_scale", None)
    return None if s is None else float(s)


def quantizable_table(model, group: int):
    """(name, nn.Embedding) of the table --embedding-bits quantizes; one CompotError line when it cannot be (checked
    before any work)."""
    from torch import nn

    from ..storage.modules import QuantEmbedding

    name, emb = input_embedding(model)
    if isinstance(emb, QuantEmbedding):
        raise CompotError("the embedding table is already quantized")
    if not isinstance(emb, nn.Embedding):
        raise CompotError(f"--embedding-bits: {name} is a {type(emb).__name__}, not a table of rows")
    if emb.weight.shape[1] % group:
        raise CompotError(f"--embedding-bits: the hidden size {emb.weight.shape[1]} is not a multiple of the group "
                          f"{group} (--embedding-group)")
    return name, emb


def tied_head(model, emb) -> str | None:
    """The qualified name of the LM head that shares `emb`'s table, or None."""
    out = model.get_output_embeddings()
    if out is None or getattr(out, "weight", None) is None or out.weight.data_ptr() != emb.weight.data_ptr():
        return None
    return next(name for name, mod in model.named_modules() if mod is out)


def resolve_bits(model, bits, group: int, joint: bool = False) -> int | str | None:
    """The bits --embedding-bits means for `model`: "auto" → 4 for an untied table whose rows split into groups of
    `group`, else None (left at the storage dtype); 4/8 → checked now (one error line before any work); "joint"
    (allowed with `joint`, the joint allocator's file budget) → checked now, "joint": the allocator picks."""
    if bits is None:
        return None
    if bits == "joint":
        if not joint:
            raise CompotError("--embedding-bits joint needs the joint allocator's file budget: compress --target-bytes")
        quantizable_table(model, group)
        return bits
    if bits != "auto":
        quantizable_table(model, group)
        return int(bits)
    try:
        _, emb = quantizable_table(model, group)
    except CompotError:
        return None
    return None if tied_head(model, emb) else 4


def rtn_rows(E, bits: int, group: int, chunk: int = 8192):
    """Symmetric round-to-nearest of Eᵀ (E: (V, H); blocks of `group` along H), `chunk` rows of E at a time: rows
    are independent, so this equals one rtn(Eᵀ) without its float64 copy of the whole table (Gemma's: 1.3 GB)."""
    from .gptq import by_columns, rtn

    return by_columns(lambda w: rtn(w, bits, group, sym=True), E.T, chunk)


# The damping of the tied head's GPTQ: λ·mean(diag H)·I added to H pulls the solution toward round-to-nearest, which
# is what the table's other role (lookups, weighed by nothing) wants. Measured on Gemma-3-270M, table 4-bit g32, the
# linears dense, 8 × 512 held-out tokens (dense 23.19): RTN 27.46; GPTQ damp 0.01 26.13, 0.1 25.54, 0.3 25.39,
# 1.0 25.73.
HEAD_DAMP = 0.3


def gptq_head(E, gram, bits: int, group: int, damp: float = HEAD_DAMP, name: str = "head", chunk: int = 8192,
              progress: bool = True):
    """GPTQ of Eᵀ (E: (V, H)) as the weight of a tied LM head whose inputs have Gram `gram` (H × H): symmetric,
    blocks of `group` along H. The vocabulary's columns share one factored inverse Hessian and are independent,
    so they go `chunk` at a time."""
    from ..progress import bar as progress_bar
    from .gptq import by_columns, gptq

    Hs = 2.0 * gram.G / max(gram.n, 1)
    cache: dict = {}
    with progress_bar(total=E.shape[0], desc=f"GPTQ {name}", unit="row", progress=progress) as bar:
        def one(w):
            q = gptq(w, Hs, bits, group, sym=True, damp=damp, name=name, n_tokens=gram.n, cache=cache)
            bar.update(w.shape[1])
            return q

        return by_columns(one, E.T, chunk)


def table_errors2(E, rows, gram=None, counts=None) -> tuple[float, float | None]:
    """Relative squared errors of a stored table: of its rows (what a lookup reads; each row weighed by
    `counts` (V,), how often it is looked up, when given) and, given the Gram G of a tied head's inputs, of the
    head's output, tr(ΔGΔᵀ) / tr(EGEᵀ), Δ the stored rows − E. In row chunks (no float64 copy of the table).
    E: (V, H); rows(i0, i1): the stored rows i0..i1 − 1, (i1 − i0, H)."""
    num = den = hnum = hden = 0.0
    for i in range(0, E.shape[0], 8192):
        ref = E[i : i + 8192].double()
        err = rows(i, i + ref.shape[0]).double() - ref
        w = None if counts is None else counts[i : i + ref.shape[0]].double()
        num += float(err.square().sum(1) @ w if w is not None else err.square().sum())
        den += float(ref.square().sum(1) @ w if w is not None else ref.square().sum())
        if gram is not None:
            hnum += float(((err @ gram.G) * err).sum())
            hden += float(((ref @ gram.G) * ref).sum())
    return num / (den or 1.0), hnum / (hden or 1.0) if gram is not None else None


def packed_table(E, bits: int, group: int, dtype: str, scale: float | None = None, head_gram=None,
                 name: str = "head", progress: bool = True):
    """The QuantEmbedding storing E: (V, H) at `bits` in groups of `group` (scales rounded through the storage
    dtype): GPTQ as a tied head whose inputs have Gram `head_gram` when given, else round-to-nearest."""
    from ..layers import round_to
    from ..storage.modules import QuantEmbedding
    from ..storage.packing import QuantTensor

    V, H = E.shape
    qz = (gptq_head(E, head_gram, bits, group, name=name, progress=progress) if head_gram is not None
          else rtn_rows(E, bits, group))
    new = QuantEmbedding(V, H, bits, group, scale)
    new.table = QuantTensor.from_quantized(qz, lambda t: round_to(t, dtype))
    return new


def quantize_embeddings(model, bits: int, group: int, dtype: str, method: str = "rtn", batches=None,
                        progress: bool = True) -> dict:
    """Replace the model's token embedding by its QuantEmbedding in place (scales rounded through the storage
    dtype `dtype`, as stored); returns the `embeddings` entry of the compot config section. method "gptq" with a
    tied head: GPTQ on the Gram of the head's inputs over `batches` (calibration); otherwise round-to-nearest."""
    import torch

    from ..calibrate.runner import input_gram
    from ..models import set_module
    from ..storage.budget import embedding_bytes, value_bytes
    from ..storage.modules import TiedQuantHead

    name, emb = quantizable_table(model, group)
    head = tied_head(model, emb)
    V, H = emb.weight.shape
    gram = None
    if head is not None and method == "gptq":
        if not batches:
            raise CompotError("GPTQ of the tied embedding table needs calibration batches")
        gram = input_gram(model, model.get_submodule(head), batches, "head Gram", progress)
    else:
        method = "rtn"
    new = packed_table(emb.weight.data, bits, group, dtype, embed_scale(emb), gram, f"{head} (tied table)", progress)
    set_module(model, name, new)
    if head is not None:
        set_module(model, head, TiedQuantHead(new.table))
    err2, head_err2 = table_errors2(emb.weight.data, lambda i0, i1: new.rows(torch.arange(i0, i1)), gram)
    err, head_err = err2 ** 0.5, None if head_err2 is None else head_err2 ** 0.5
    vb = value_bytes(dtype)
    entry = {"module": name, "num_embeddings": V, "embedding_dim": H, "bits": bits, "group": group,
             "method": method, "embed_scale": new.embed_scale, "tied_head": head,
             "bytes": embedding_bytes(V, H, bits, group, vb), "dense_bytes": embedding_bytes(V, H, None, group, vb),
             "rel_error": float(err)}
    if head_err is not None:
        entry["head_rel_error"] = head_err
    return entry


def empty_embeddings(model, entry: dict) -> None:
    """Put an empty QuantEmbedding where `entry` (the compot section's `embeddings`) says, for loading."""
    from ..models import set_module
    from ..storage.modules import QuantEmbedding, TiedQuantHead

    emb = QuantEmbedding(entry["num_embeddings"], entry["embedding_dim"], entry["bits"], entry["group"],
                         entry.get("embed_scale"))
    set_module(model, entry["module"], emb)
    if entry.get("tied_head"):
        set_module(model, entry["tied_head"], TiedQuantHead(emb.table))
