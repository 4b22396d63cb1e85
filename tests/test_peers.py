"""The package beside ONNX Runtime's one-line quantizers (compot_deploy/peers.py)."""

from compot_deploy.peers import comparison, dominates, markdown


def _pt(label, mb, cos=None, ppl=None):
    task = {"mean_cosine": cos} if cos is not None else {"perplexity": ppl, "perplexity_original": 20.0}
    return {"name": label, "label": label, "file_bytes": int(mb * 1e6), "task": task}


def test_dominance_is_smaller_and_better_strictly_in_one():
    ours = _pt("ours", 20, cos=0.95)
    assert dominates(_pt("a", 19, cos=0.95), ours) and dominates(_pt("b", 20, cos=0.96), ours)
    assert not dominates(_pt("c", 20, cos=0.95), ours)  # equal is not better
    assert not dominates(_pt("d", 19, cos=0.94), ours) and not dominates(_pt("e", 21, cos=0.99), ours)
    # perplexity: lower is better
    ours = _pt("ours", 20, ppl=30.0)
    assert dominates(_pt("f", 20, ppl=29.0), ours) and not dominates(_pt("g", 19, ppl=31.0), ours)
    assert not dominates({"label": "h", "file_bytes": 1, "task": None}, ours)  # unmeasured never dominates


def test_comparison_rows_and_verdict():
    ours = {"label": "package", "file_bytes": 30_000_000, "task": {"mean_cosine": 0.92}}
    peers = [_pt("int8", 22.9, cos=0.97), _pt("int4-b32", 54, cos=0.99)]
    lat = {"ort_compressed": {"rss_mib": 150.0, "p50_ms": {"1x16": 2.0}},
           "peer_int8": {"rss_mib": 120.0, "p50_ms": {"1x16": 1.5}}}
    cmp = comparison(ours, peers, lat, {"label": "dense", "file_bytes": 90_000_000})
    assert cmp["dominated_by"] == ["int8"]
    assert [r["label"] for r in cmp["rows"]] == ["package", "int8", "int4-b32", "dense"]
    assert cmp["rows"][-1]["quality"] == 1.0 and cmp["rows"][0]["rss_mib"] == 150.0
    md = markdown(cmp)
    assert "**Dominated**" in md and "| int8 | 22.9 | 0.9700 | 120 | 1.50 |" in md
