"""Latency and memory of models on PyTorch and ONNX Runtime, each (target, backend) in its own process.

The parent starts one worker process per measurement and samples its resident memory with psutil every few
milliseconds; the worker also reports its own peak (VmHWM), its load time and, on CUDA, its peak device
memory. Rounds repeat every measurement in turn, so run-to-run spread is stated next to every ratio.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

from .errors import CompotError


# --------------------------------------------------------------------------------------------- in the worker


def _feed(spec: dict, batch: int, seq: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    if spec.get("image"):  # an image model: `batch` images of the processor's size (seq: the tokens it makes)
        return {"pixel_values": rng.standard_normal((batch, *spec["image"])).astype(np.float32)}
    if spec.get("audio"):  # a speech model: `batch` log-mel windows, then the decoder's first call
        return {"input_features": rng.standard_normal((batch, *spec["audio"])).astype(np.float32),
                "decoder_input_ids": np.full((batch, 1), spec["start"], np.int64)}
    ids = rng.integers(1000, min(spec["vocab"], 20000), (batch, seq), dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": np.ones((batch, seq), np.int64)}
    if spec.get("start") is not None:  # an encoder-decoder: the encoder, then the decoder's first call
        feed["decoder_input_ids"] = np.full((batch, 1), spec["start"], np.int64)
    if spec["token_type_ids"]:
        feed["token_type_ids"] = np.zeros((batch, seq), np.int64)
    return feed


def _stats(seconds: list[float], tokens: int) -> dict:
    import numpy as np

    ms = np.asarray(seconds) * 1e3
    return {"p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
            "p99_ms": float(np.percentile(ms, 99)), "mean_ms": float(ms.mean()),
            "tokens_per_s": float(tokens / (ms.mean() / 1e3)), "n": len(ms)}


def _timed(fn, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def _model_spec(path: Path, kind: str) -> dict:
    from .models import read_hf_config
    from .runtimes.loader import start_token

    cfg = read_hf_config(path)
    text = cfg.get("text_config", cfg)
    archs = cfg.get("architectures") or []
    if kind == "ort":
        man = json.loads((path / "export.json").read_text())
        seq2seq = man["graph"]["kind"] == "seq2seq"
        decoder = seq2seq or man["graph"]["kind"] == "decoder"
        token_types = "token_type_ids" in man["graph"]["inputs"]
    else:
        seq2seq = bool(cfg.get("is_encoder_decoder")) and not any("Encoder" in a for a in archs)  # T5EncoderModel
        decoder = seq2seq or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs) \
            or bool(cfg.get("is_decoder"))
        token_types = cfg.get("type_vocab_size", 0) > 0 and not decoder
    start = start_token(cfg) if seq2seq else None
    spec = {"vocab": text.get("vocab_size", 30000), "decoder": decoder, "token_type_ids": token_types, "start": start}
    if "image_size" in cfg and "num_channels" in cfg:
        size = cfg["image_size"]
        h, w = (size, size) if isinstance(size, int) else size
        spec["image"] = (cfg["num_channels"], h, w)
        spec["encoder_positions"] = (h // cfg["patch_size"]) * (w // cfg["patch_size"]) + 1 if "patch_size" in cfg else 1
    if seq2seq and "num_mel_bins" in cfg and "max_source_positions" in cfg:  # Whisper: a fixed 2 × positions frames
        spec["audio"] = (cfg["num_mel_bins"], 2 * cfg["max_source_positions"])
        spec["encoder_positions"] = cfg["max_source_positions"]
    return spec


def _decode_times(step, prompt, steps: int, warmup: int) -> list[float]:
    """Seconds of each one-token decode call of greedy decoding after a prefill of the ids `prompt` (B, L), the
    first `warmup` calls left out. step: as runtimes.loader.greedy takes it."""
    from .runtimes.loader import greedy

    times = []

    def timed(*args):
        t0 = time.perf_counter()
        out = step(*args)
        times.append(time.perf_counter() - t0)
        return out

    greedy(timed, prompt, warmup + steps)
    return times[1 + warmup:]


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM (per address space, so not inherited across exec the way
    getrusage's ru_maxrss is), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(job: dict) -> dict:
    """Run in a worker: load the target, time every shape, report peak memory."""
    from .runtimes import artifact_bytes, runtime, torch_step
    from .runtimes.ort import OrtDecoder

    path = Path(job["target"])
    t0 = time.perf_counter()
    rt = runtime(path, job["backend"], job["device"], job.get("threads"))
    rt.load()
    load_s = time.perf_counter() - t0
    rss_loaded = peak_rss_bytes()
    spec = _model_spec(path, rt.kind)
    rows = []
    shapes = job["shapes"]
    if spec.get("image") or spec.get("audio"):  # one row per batch size; seq: the encoder's positions
        shapes = sorted({(b, spec["encoder_positions"]) for b, _ in shapes})
    for b, L in shapes:
        feed = _feed(spec, b, L)
        if spec["decoder"] and rt.kind == "ort" and spec["start"] is None:  # a prefill: positions 0…L-1, no cache
            import numpy as np

            feed["position_ids"] = np.arange(L, dtype=np.int64)[None].repeat(b, 0)
            feed.update(OrtDecoder(rt.sess).empty_past(b))
        row = {"batch": b, "seq": L, **_stats(_timed(lambda feed=feed: rt.run(feed), job["warmup"], job["repeat"]), b * L)}
        if spec["decoder"] and job.get("decode_steps"):
            if spec["start"] is not None:  # decoder calls after the encoder's
                step, prompt = rt.decoder_step(feed), feed["decoder_input_ids"]
            else:
                step = OrtDecoder(rt.sess).step if rt.kind == "ort" else torch_step(rt.model, rt.device)
                prompt = _feed(spec, b, L)["input_ids"]
            dec = _decode_times(step, prompt, job["decode_steps"], min(job["warmup"], 3))
            row["decode"] = _stats(dec, b)
        rows.append(row)
    res = {"load_s": load_s, "artifact_bytes": artifact_bytes(path), "runtime": rt.describe(), "rows": rows,
           "peak_rss_bytes": peak_rss_bytes(),
           "peak_rss_after_load_bytes": rss_loaded, "decoder": spec["decoder"]}
    if job["device"] == "cuda":
        res["peak_cuda_bytes"] = _peak_cuda(rt)
    return res


def _peak_cuda(rt) -> int | None:
    """Peak device memory: torch's allocator peak, or for ORT this process's usage as NVML reports it."""
    if rt.kind == "torch":
        import torch

        return int(torch.cuda.max_memory_allocated())
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        return max((p.usedGpuMemory or 0 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)
                    if p.pid == os.getpid()), default=None)
    except Exception:  # noqa: BLE001 - NVML absent or not permitted: say unknown rather than guess
        return None


# --------------------------------------------------------------------------------------------- in the parent


def run_job(job: dict, poll_s: float = 0.005) -> dict:
    """One worker process; its RSS sampled from here (psutil) while it runs."""
    import psutil

    proc = subprocess.Popen([sys.executable, "-m", "compot_deploy.bench", json.dumps(job)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
    peak = [0]

    def sample():
        try:
            p = psutil.Process(proc.pid)
            while proc.poll() is None:
                peak[0] = max(peak[0], p.memory_info().rss)
                time.sleep(poll_s)
        except psutil.NoSuchProcess:
            pass

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, err = proc.communicate()
    th.join()
    if proc.returncode != 0:
        last = (err.strip().splitlines() or ["no output"])[-1]
        raise CompotError(f"benchmark of {job['target']} on {job['backend']}/{job['device']} failed: {last}")
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_sampled_bytes"] = peak[0]
    return res


def environment() -> dict:
    import psutil

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    env = {"cpu": cpu, "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
           "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
           "platform": platform.platform()}
    for mod in ("torch", "onnxruntime", "transformers"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    try:
        import onnxruntime as ort

        env["ort_providers"] = ort.get_available_providers()
    except ImportError:
        pass
    return env


def bench(targets: list[tuple[str, str]], cfg, progress=None) -> dict:
    """targets: [(label, path)]; cfg: BenchConfig. Every applicable (target, backend, device) is measured
    cfg.rounds times, the rounds interleaved."""
    from .runtimes import target_kind

    shapes = [list(s) for s in cfg.shapes]
    jobs = []
    for label, path in targets:
        kind = target_kind(path)
        if cfg.backends and kind not in cfg.backends:
            continue
        for device in cfg.devices:
            jobs.append({"label": label, "target": str(Path(path).resolve()), "backend": kind, "device": device,
                         "shapes": shapes, "warmup": cfg.warmup, "repeat": cfg.repeat, "threads": cfg.threads,
                         "decode_steps": cfg.decode_steps})
    if not jobs:
        raise CompotError("no target matches the chosen backends")
    results = {f"{j['label']}|{j['backend']}|{j['device']}": {**j, "rounds": []} for j in jobs}
    for r in range(cfg.rounds):
        for j in jobs:
            if progress:
                progress(f"round {r + 1}/{cfg.rounds}: {j['label']} on {j['backend']}/{j['device']}")
            results[f"{j['label']}|{j['backend']}|{j['device']}"]["rounds"].append(run_job(j))
    return {"environment": environment(), "settings": {"warmup": cfg.warmup, "repeat": cfg.repeat,
                                                       "rounds": cfg.rounds,
                                                       "threads": cfg.threads or "library default", "shapes": shapes},
            "results": list(results.values())}


def summary_rows(report: dict) -> list[dict]:
    """One row per (result, shape): p50 of each round, the median over rounds, and the rounds' spread."""
    import numpy as np

    rows = []
    for res in report["results"]:
        for i, first in enumerate(res["rounds"][0]["rows"]):  # an image model's rows: one per batch size
            b, L = first["batch"], first["seq"]
            p50 = [r["rows"][i]["p50_ms"] for r in res["rounds"]]
            row = {"label": res["label"], "backend": res["backend"], "device": res["device"], "batch": b, "seq": L,
                   "p50_ms": float(np.median(p50)), "p50_rounds": p50,
                   "p90_ms": float(np.median([r["rows"][i]["p90_ms"] for r in res["rounds"]])),
                   "p99_ms": float(np.median([r["rows"][i]["p99_ms"] for r in res["rounds"]])),
                   "tokens_per_s": float(np.median([r["rows"][i]["tokens_per_s"] for r in res["rounds"]])),
                   "peak_rss_mib": max(r["peak_rss_bytes"] for r in res["rounds"]) / 2**20,
                   "load_s": float(np.median([r["load_s"] for r in res["rounds"]])),
                   "artifact_mib": res["rounds"][0]["artifact_bytes"] / 2**20}
            if res["rounds"][0].get("peak_cuda_bytes") is not None:
                row["peak_cuda_mib"] = max(r["peak_cuda_bytes"] or 0 for r in res["rounds"]) / 2**20
            if "decode" in res["rounds"][0]["rows"][i]:
                row["decode_ms_per_token"] = float(np.median([r["rows"][i]["decode"]["p50_ms"] for r in res["rounds"]]))
            rows.append(row)
    return rows


def ratio_with_spread(report: dict, num: str, den: str, batch: int, seq: int, device: str = "cpu") -> dict | None:
    """p50(num)/p50(den) per round (same shape, same device): the median ratio and its spread across rounds."""
    pick = {(r["label"], r["device"]): r for r in report["results"]}
    a, b = pick.get((num, device)), pick.get((den, device))
    if not a or not b:
        return None
    i = [(r["batch"], r["seq"]) for r in a["rounds"][0]["rows"]].index((batch, seq))
    ratios = [ra["rows"][i]["p50_ms"] / rb["rows"][i]["p50_ms"] for ra, rb in zip(a["rounds"], b["rounds"])]
    import statistics

    return {"ratio": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": ratios}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = ["# Latency and memory", "",
             f"{env['cpu']}, {env['logical_cores']} logical cores, {env['memory_gib']} GiB; torch {env['torch']}, "
             f"onnxruntime {env['onnxruntime']} ({', '.join(env.get('ort_providers', []))}). "
             f"Warmup {report['settings']['warmup']}, repeat {report['settings']['repeat']}, rounds "
             f"{report['settings']['rounds']}, threads: {report['settings']['threads']}. Each measurement in its own "
             "process; p50 is the median over rounds of each round's median; 'rounds' lists each round's p50.", "",
             "| model | backend | device | batch×seq | p50 ms | rounds (p50 ms) | p90 ms | p99 ms | tokens/s | "
             "peak RSS MiB | peak GPU MiB | load s | artifact MiB | decode ms/token |",
             "|---|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summary_rows(report):
        rounds = " / ".join(f"{x:.2f}" for x in r["p50_rounds"])
        lines.append(f"| {r['label']} | {r['backend']} | {r['device']} | {r['batch']}×{r['seq']} | {r['p50_ms']:.2f} | "
                     f"{rounds} | {r['p90_ms']:.2f} | {r['p99_ms']:.2f} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_rss_mib']:.0f} | {r.get('peak_cuda_mib', float('nan')):.0f} | {r['load_s']:.2f} | "
                     f"{r['artifact_mib']:.1f} | {r.get('decode_ms_per_token', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def chart(report: dict, path: Path) -> bool:
    """Latency per backend (grouped by shape) and latency against artifact bytes; False when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = summary_rows(report)
    shapes = sorted({(r["batch"], r["seq"]) for r in rows})
    names = list(dict.fromkeys(f"{r['label']} ({r['backend']}/{r['device']})" for r in rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5))
    width = 0.8 / max(len(names), 1)
    for k, name in enumerate(names):
        vals = [next((r["p50_ms"] for r in rows if f"{r['label']} ({r['backend']}/{r['device']})" == name
                      and (r["batch"], r["seq"]) == s), 0) for s in shapes]
        ax1.bar([i + k * width for i in range(len(shapes))], vals, width, label=name)
    ax1.set_xticks([i + 0.4 - width / 2 for i in range(len(shapes))], [f"{b}×{L}" for b, L in shapes])
    ax1.set_ylabel("p50 latency (ms)")
    ax1.set_yscale("log")
    ax1.set_title("Latency per backend")
    ax1.legend(fontsize=7)
    for s in shapes:
        pts = [(r["artifact_mib"], r["p50_ms"], f"{r['label']} ({r['backend']}/{r['device']})") for r in rows
               if (r["batch"], r["seq"]) == s]
        ax2.scatter([p[0] for p in pts], [p[1] for p in pts], label=f"{s[0]}×{s[1]}")
        for x, y, n in pts:
            ax2.annotate(n, (x, y), fontsize=6)
    ax2.set_xlabel("artifact size (MiB)")
    ax2.set_ylabel("p50 latency (ms)")
    ax2.set_yscale("log")
    ax2.set_title("Latency against artifact bytes")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True


def write_reports(report: dict, out: Path) -> list[Path]:
    from .storage.artifact import write_json_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "bench.json", report)
    md = out / "bench.md"
    md.write_text(markdown(report))
    paths = [out / "bench.json", md]
    if chart(report, out / "bench.png"):
        paths.append(out / "bench.png")
    return paths


if __name__ == "__main__":  # worker: python -m compot_deploy.bench '<job json>'
    import logging

    logging.disable(logging.WARNING)
    print(json.dumps(measure(json.loads(sys.argv[1]))))
