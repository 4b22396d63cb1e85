"""What a `compress` has finished, on disk beside its output, so a killed run resumes where it stopped.

The folder `.OUT.resume` (beside OUT) holds `job.json` (the configuration and the checkpoint's files, sizes and
times: a run resumes only the very same job), the Grams (calibrate/runner.GramStore), `allocation.json` once the
budget is split (then calibration and allocation are not run again), and one safetensors file per finished block
(every tensor of the block as it will be saved: parameters at the storage dtype, which holds the rounded values
exactly; each layer's measurements in the metadata). A finished block leaves memory (its parameters are read
back from its file if a later stage needs them), and the output's weights are copied from these files
(storage/shards.py), so a resumed run writes the same bytes as an uninterrupted one. The folder is removed when
the output is written, and when the run fails with an error of its input (nothing half-written stays); a kill or
a crash leaves it for the next run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from .storage.record import LayerRecord, LayerStats

log = logging.getLogger(__name__)


def resume_folder(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.resume"


def checkpoint_identity(model_dir: Path) -> list:
    """(name, bytes, modification time in ns) of every file of the model folder: what the Grams were made of."""
    return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(model_dir).iterdir() if p.is_file())


class ResumeState:
    """The finished parts of one compress job in `folder` (created if missing; wiped when it holds another job)."""

    def __init__(self, folder: Path, job: dict):
        self.folder = Path(folder)
        job = json.loads(json.dumps(job, sort_keys=True))  # as it reads back (tuples become lists)
        if self.folder.is_dir():
            try:
                same = json.loads((self.folder / "job.json").read_text()) == job
            except (OSError, ValueError):
                same = False
            if not same:
                log.info("%s holds another job's work: starting over", self.folder)
                shutil.rmtree(self.folder)
        (self.folder / "blocks").mkdir(parents=True, exist_ok=True)
        (self.folder / "grams").mkdir(exist_ok=True)
        _write_atomic(self.folder / "job.json", json.dumps(job, sort_keys=True))

    @property
    def grams_folder(self) -> Path:
        return self.folder / "grams"

    # ---- calibration + allocation
    def allocation(self):
        """(records, calibration summary, Gram index, seconds of calibrate and allocate) of a finished split; None
        before."""
        path = self.folder / "allocation.json"
        if not path.is_file():
            return None
        a = json.loads(path.read_text())
        records = {n: LayerRecord.from_json(e) for n, e in a["records"].items()}
        grams = {n: (self.grams_folder / f, d, c) for n, (f, d, c) in a["grams"].items()}
        return records, a["calibration"], grams, a["timings"]

    def save_allocation(self, records: dict[str, LayerRecord], calibration: dict, grams: dict, timings: dict) -> None:
        _write_atomic(self.folder / "allocation.json", json.dumps({
            "records": {n: r.to_json() for n, r in records.items()}, "calibration": calibration,
            "grams": {n: (Path(p).name, d, c) for n, (p, d, c) in grams.items()}, "timings": timings}))

    # ---- factored blocks
    def _block_path(self, i: int) -> Path:
        return self.folder / "blocks" / f"block-{i:05d}.safetensors"

    def has_block(self, i: int) -> bool:
        return self._block_path(i).is_file()

    def finished(self, model) -> dict[str, Path]:
        """Qualified name of each finished block of `model` → its file."""
        from .models import block_module

        out = {}
        for path in sorted((self.folder / "blocks").glob("block-*.safetensors")):
            out[block_module(model, int(path.stem.split("-")[1]))[0]] = path
        return out

    def save_block(self, model, i: int, names: list[str], stats: dict[str, LayerStats], dtype: str) -> None:
        """Block i of `model`, its layers `names` factored (in memory): every tensor of the block (parameters at
        `dtype`, as the model is saved), the layers' measurements in the metadata; then the block's parameters
        are read from that file if needed again (streaming.BlockWeights.store), so it holds no memory."""
        import torch
        from safetensors.torch import save_file

        from .models import block_module
        from .streaming import weights_for

        prefix, block = block_module(model, i)
        params = {n for n, _ in block.named_parameters(prefix=prefix)}
        tensors = {k: (v.detach().to(getattr(torch, dtype)) if k in params and v.is_floating_point() else v).contiguous()
                   for k, v in block.state_dict(prefix=prefix + ".").items()}
        meta = {"stats": json.dumps({n: stats[n].to_json() for n in names}, sort_keys=True)}
        path = self._block_path(i)
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
        weights_for(model).store(block, prefix, path)

    def restore_block(self, model, i: int, names: list[str], records: dict[str, LayerRecord],
                      stats: dict[str, LayerStats]) -> None:
        """Put block i back as it was saved: its factored layers as their (empty) modules, every parameter left
        in the file until needed (BlockWeights.store), the buffers (code positions) read; and the layers'
        measurements."""
        from safetensors import safe_open

        from .errors import CompotError
        from .models import block_module, set_module
        from .streaming import weights_for

        path = self._block_path(i)
        prefix, block = block_module(model, i)
        with safe_open(str(path), "pt") as f:
            saved = json.loads(f.metadata()["stats"])
            for n in names:
                stats[n] = LayerStats(**saved[n])
                if records[n].factored:
                    set_module(model, n, records[n].empty_module())
            keys = set(f.keys())
            if keys != set(block.state_dict(prefix=prefix + ".")):
                raise CompotError(f"{path} does not hold block {i} of this model: delete {self.folder} and run again")
            for k, b in block.named_buffers(prefix=prefix):
                if k in keys:
                    b.copy_(f.get_tensor(k))
        weights_for(model).store(block, prefix, path)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
