"""What the commands print: the compression table, the build summary, the gate's result."""

from __future__ import annotations

import click


def _table(rows: list[tuple[str, ...]], left: int) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        click.echo("  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        if j == 0:
            click.echo("  ".join("-" * w for w in widths))


def print_report(report: dict) -> None:
    """The per-layer table and totals of a compression report (compress, quantize)."""
    from ..storage.record import LayerRecord

    rows = [("layer", "method", "shape", "removed", "rel.err", "sec")]
    for lay in report["layers"]:
        rec = LayerRecord.model_validate({k: lay[k] for k in LayerRecord.model_fields if k in lay})
        method = rec.method + (f"+{rec.quant.label}" if rec.quant else "")
        err = lay.get("quant_rel_error", lay.get("rel_error"))
        sec = lay.get("seconds", 0.0) + lay.get("quant_seconds", 0.0)
        rows.append((lay["name"], method, rec.shape_label, f"{lay['ratio']:.3f}",
                     "-" if err is None else f"{err:.4f}", f"{sec:.2f}"))
    _table(rows, left=3)
    lin, mf = report["linears"], report["model_file"]
    click.echo(f"\ncompressed linears: {lin['file_bytes']:,} of {lin['dense_bytes']:,} dense bytes "
               f"-> fraction removed {lin['file_ratio']:.4f} (planned {lin['planned_ratio']:.4f}), read from the "
               f"saved file; {lin['paper_ratio']:.4f} as the papers count (values only)")
    click.echo(f"model file: {mf['bytes']:,} bytes vs {mf['dense_bytes']:,} dense at the same dtype "
               f"-> fraction removed {mf['ratio']:.4f}; total {report['seconds']:.1f}s"
               + (" (" + ", ".join(f"{k} {v:.1f}s" for k, v in report["timings"].items()) + ")"
                  if report.get("timings") else ""))
    if report.get("prune"):
        p = report["prune"]
        for w in p["windows"]:
            fit = (f"{w['map']} map folded into {w['branch']}, unexplained {w['residual']:.3f}"
                   if w["map"] != "none" else "no map")
            click.echo(f"pruned blocks {w['start']}-{w['start'] + w['blocks'] - 1} (angular distance "
                       f"{w['distance']:.4f}; {fit}, {w['residual_without_map']:.3f} without a map); "
                       f"{p['removed_linear_bytes']:,} linear bytes gone")
    if report.get("embeddings"):
        e = report["embeddings"]
        click.echo(f"embedding table {e['module']} ({e['num_embeddings']:,} x {e['embedding_dim']}): {e['bits']}-bit in "
                   f"groups of {e['group']} ({e.get('method', 'rtn')}), {e['bytes']:,} of {e['dense_bytes']:,} "
                   f"bytes, rel. error {e['rel_error']:.4f}"
                   + (f", tied head's output rel. error {e['head_rel_error']:.4f}" if "head_rel_error" in e else ""))
    if report.get("calibration"):
        from ..calibrate.data import TOKENS_PER_DIM

        c = report["calibration"]
        short = "" if c["enough"] else f" -- fewer than {TOKENS_PER_DIM}: more text would help (--calib, --samples)"
        click.echo(f"calibration: {c['tokens']:,} tokens, {c['tokens_per_input_dim']:.1f} per dimension of the widest "
                   f"input ({c['widest_input']:,}){short}")
    if report.get("joint"):
        j = report["joint"]
        click.echo(f"joint allocation within {j['budget_text']} ({'fits' if j['fits'] else 'DOES NOT FIT'}), per "
                   f"layer: {choices_line(j)}"
                   + (f"; embedding table: {j['table']['choice']} ({j['table']['bytes']:,} bytes)" if "table" in j
                      else ""))
        if j.get("depth"):
            d = j["depth"]
            click.echo(f"depth: removing {d['blocks']} block(s) {d['removed_blocks']} changes the final hidden states "
                       f"by {d['prune_error']:.4g}; estimated error with pruning {d['estimated_error_with_pruning']:.4g}"
                       f" vs {d['estimated_error_without_pruning']:.4g} without -> "
                       + ("pruned" if d["pruned"] else "not pruned"))


def task_line(task: dict | None) -> str | None:
    """The task-level change against the original model, as one line (None when it was not measured)."""
    task = task or {}
    if "mean_cosine" in task:
        return f"embedding cosine {task['mean_cosine']:.4f} (min {task['min_cosine']:.4f})"
    if "next_token_agreement" in task:
        return (f"next-token agreement {task['next_token_agreement']:.4f}, perplexity {task['perplexity']:.2f} "
                f"(original {task['perplexity_original']:.2f})")
    return None


def choices_line(joint: dict) -> str:
    return ", ".join(f"{n}× {c}" for c, n in joint["choices"].items())


def print_build_summary(s: dict) -> None:
    click.echo(f"fraction of the compressed linears' bytes removed: {s['byte_ratio']:.4f} "
               f"(model file {s['model_file_ratio']:.4f})")
    if s.get("pruned_blocks"):
        click.echo(f"blocks removed (ReplaceMe): {', '.join(map(str, s['pruned_blocks']))}")
    if s.get("joint"):
        click.echo(f"joint allocation, per layer: {choices_line(s['joint'])}")
    if task_line(s.get("task")):
        click.echo(f"quality vs original: {task_line(s.get('task'))}")
    click.echo(f"ORT vs PyTorch: max abs {s['ort_vs_pytorch_max_abs']:.2e} (gate passed)")
    for r in s.get("latency", []):
        click.echo(f"ORT latency {r['batch']}x{r['seq']}: {r['compressed_ms']:.2f} ms vs dense {r['dense_ms']:.2f} ms "
                   f"({r['ratio']:.2f}x); peak RSS {r['compressed_rss_mib']:.0f} vs {r['dense_rss_mib']:.0f} MiB")
    peers = s.get("peers")
    if peers:
        for r in peers["rows"]:
            q = "" if r["quality"] is None else f", {r['metric']} {r['quality']:.4g}"
            rss = f", session peak RSS {r['rss_mib']:.0f} MiB" if r.get("rss_mib") else ""
            p50 = ", ".join(f"{k} {v:.2f} ms" for k, v in r.get("p50_ms", {}).items())
            click.echo(f"  {r['label']}: {r['file_bytes'] / 1e6:.1f} MB{q}{rss}" + (f"; p50 {p50}" if p50 else ""))
        if peers.get("skipped"):
            click.echo(f"ORT one-liners not measured: {peers['skipped']}")
        elif peers["dominated_by"]:
            click.echo(f"the package is dominated (smaller and better) by: {', '.join(peers['dominated_by'])}")
        else:
            click.echo("no ORT one-liner is both smaller and better than the package")
    if s["reused"]:
        click.echo(f"reused stages: {', '.join(s['reused'])}")


def print_validation(rep: dict) -> None:
    ov = rep["parity"].get("overall")
    if ov:
        click.echo(f"parity ({rep['device']}): max abs {ov['max_abs']:.2e}, mean abs {ov['mean_abs']:.2e}, "
                   f">1e-3: {ov['over_1e-3']}, cosine {ov['cosine']:.8f}"
                   + (f", tokens differing {rep['parity']['tokens']['mismatches']}/{rep['parity']['tokens']['total']}"
                      if rep["parity"].get("tokens") else ""))
    if task_line(rep.get("task")):
        click.echo(f"vs original: {task_line(rep.get('task'))}")
