"""Task-level quality against the original model: mean-pooled sentence embeddings (encoders), perplexity and top-1
next-token agreement on held-out text (decoders)."""

from __future__ import annotations


def mean_pooled_embeddings(model, tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 128):
    """(n, hidden) float64 mean of last_hidden_state over real tokens, as sentence-transformers does."""
    import torch

    from .runtimes.loader import mean_pool

    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            h = model(**enc).last_hidden_state
            out.append(torch.from_numpy(mean_pool(h.numpy(), enc["attention_mask"].numpy())))
    return torch.cat(out)


def embedding_agreement(ref, emb) -> dict:
    """Cosine of each sentence's embedding to the reference's, and the Spearman correlation of the two
    models' pairwise-similarity matrices (upper triangle). ref, emb: (n, hidden)."""
    import torch
    from scipy.stats import spearmanr

    cos = torch.nn.functional.cosine_similarity(ref, emb, dim=1)

    def sims(e):
        e = torch.nn.functional.normalize(e, dim=1)
        s = e @ e.T
        iu = torch.triu_indices(len(e), len(e), 1)
        return s[iu[0], iu[1]].numpy()

    return {
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "pairwise_spearman": float(spearmanr(sims(ref), sims(emb)).statistic),
    }


def token_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None):
    """Held-out text as (n, seq_len) int64 windows: the tokenizer's leading special tokens (e.g. Gemma's <bos>)
    then consecutive text tokens, no overlap, no padding."""
    import torch

    head = tokenizer("", add_special_tokens=True)["input_ids"]  # what the tokenizer puts before any text
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = seq_len - len(head)
    n = len(ids) // body if max_windows is None else min(len(ids) // body, max_windows)
    if n == 0:
        from .errors import CompotError

        raise CompotError(f"held-out text has {len(ids)} tokens, fewer than one window of {body}")
    return torch.tensor([head + ids[i * body:(i + 1) * body] for i in range(n)], dtype=torch.long)


def next_token_stats(model, windows, reference_top1=None, batch_size: int = 1) -> dict:
    """Teacher-forced next-token quality of a causal LM on windows (n, L): perplexity over the n·(L-1)
    predictions, and each position's argmax (n, L-1), with the fraction equal to `reference_top1` when given."""
    import torch

    nll, top1 = 0.0, []
    with torch.no_grad():
        for i in range(0, len(windows), batch_size):
            w = windows[i:i + batch_size]
            logits = model(input_ids=w).logits[:, :-1]  # (b, L-1, vocab): 0.5 GB per 512 tokens of Gemma
            nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(),
                                                           reduction="sum"))
            top1.append(logits.argmax(-1))
    top1 = torch.cat(top1)
    res = {"perplexity": float(torch.exp(torch.tensor(nll / top1.numel()))), "tokens": int(top1.numel()),
           "top1": top1}
    if reference_top1 is not None:
        res["top1_agreement"] = float((top1 == reference_top1).double().mean())
    return res
