"""The token embedding table stored quantized (`--embedding-bits`): round-to-nearest, symmetric, in blocks along
the hidden size; a QuantEmbedding in PyTorch, com.microsoft::GatherBlockQuantized in ONNX Runtime.

An embedding lookup has no input activations to weigh errors by (each row is read as stored), so GPTQ has nothing
to add over round-to-nearest for it. A table tied to the LM head (Gemma, GPT-2) stays tied: the head becomes a
TiedQuantHead over the same packed bytes (MatMulNBits in ONNX Runtime), stored once.
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


def resolve_bits(model, bits, group: int) -> int | None:
    """The bits --embedding-bits means for `model`: "auto" → 4 for an untied table whose rows split into groups of
    `group`, else None (left at the storage dtype); 4/8 → checked now (one error line before any work)."""
    if bits is None:
        return None
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
    import torch

    from .gptq import Quantized, rtn

    parts = [rtn(E[i : i + chunk].T, bits, group, sym=True) for i in range(0, E.shape[0], chunk)]
    return Quantized(torch.cat([p.q for p in parts], 1), torch.cat([p.scales for p in parts], 1),
                     torch.cat([p.zeros for p in parts], 1), bits, parts[0].group, True)


def quantize_embeddings(model, bits: int, group: int, dtype: str) -> dict:
    """Replace the model's token embedding by its QuantEmbedding in place (scales rounded through the storage
    dtype `dtype`, as stored); returns the `embeddings` entry of the compot config section."""
    import torch

    from ..layers import round_to
    from ..models import set_module
    from ..storage.budget import embedding_bytes, value_bytes
    from ..storage.modules import QuantEmbedding, TiedQuantHead
    from ..storage.packing import QuantTensor

    name, emb = quantizable_table(model, group)
    head = tied_head(model, emb)
    V, H = emb.weight.shape
    qz = rtn_rows(emb.weight.data, bits, group)
    new = QuantEmbedding(V, H, bits, group, embed_scale(emb))
    new.table = QuantTensor.from_quantized(qz, lambda t: round_to(t, dtype))
    set_module(model, name, new)
    if head is not None:
        set_module(model, head, TiedQuantHead(new.table))
    num = den = 0.0
    for i in range(0, V, 8192):  # in row chunks, as the quantization (no float64 copy of the table)
        rows = emb.weight.data[i : i + 8192].double()
        num += float((new.rows(torch.arange(i, i + rows.shape[0])).double() - rows).square().sum())
        den += float(rows.square().sum())
    err = (num / den) ** 0.5
    vb = value_bytes(dtype)
    return {"module": name, "num_embeddings": V, "embedding_dim": H, "bits": bits, "group": group,
            "embed_scale": new.embed_scale, "tied_head": head, "bytes": embedding_bytes(V, H, bits, group, vb),
            "dense_bytes": embedding_bytes(V, H, None, group, vb), "rel_error": float(err)}


def empty_embeddings(model, entry: dict) -> None:
    """Put an empty QuantEmbedding where `entry` (the compot section's `embeddings`) says, for loading."""
    from ..models import set_module
    from ..storage.modules import QuantEmbedding, TiedQuantHead

    emb = QuantEmbedding(entry["num_embeddings"], entry["embedding_dim"], entry["bits"], entry["group"],
                         entry.get("embed_scale"))
    set_module(model, entry["module"], emb)
    if entry.get("tied_head"):
        set_module(model, entry["tied_head"], TiedQuantHead(emb.table))
