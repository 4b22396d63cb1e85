"""Task-level quality of a compressed encoder: mean-pooled sentence embeddings against the original model."""

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
