"""What a `compress` has finished, on disk beside its output, so a killed run resumes where it stopped.

The folder `.OUT.resume` (beside OUT) holds `job.json` (the configuration and the checkpoint's files, sizes and
times: a run resumes only the very same job), the Grams (calibrate/runner.GramStore), `allocation.json` once the
budget is split (then calibration and allocation are not run again), and one safetensors file per block whose
layers are factored (their tensors at the storage dtype, which holds the rounded values exactly, and each layer's
measurements). A resumed run reads the finished blocks back instead of factoring them, so it writes the same
tensors as an uninterrupted run. The folder is removed when the output is written, and when the run fails with
an error of its input (nothing half-written stays); a kill or a crash leaves it for the next run.
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

    def save_block(self, model, i: int, names: list[str], records: dict[str, LayerRecord],
                   stats: dict[str, LayerStats], dtype: str) -> None:
        """Block i's factored layers (`names`): their tensors at `dtype`, their measurements in the metadata."""
        import torch
        from safetensors.torch import save_file

        tensors = {}
        for n in names:
            if records[n].factored:
                for k, v in model.get_submodule(n).state_dict().items():
                    tensors[f"{n}.{k}"] = v.detach().to(getattr(torch, dtype)).contiguous()
        meta = {"stats": json.dumps({n: stats[n].to_json() for n in names})}
        tmp = self._block_path(i).with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, self._block_path(i))

    def restore_block(self, model, i: int, names: list[str], records: dict[str, LayerRecord],
                      stats: dict[str, LayerStats]) -> None:
        """Put block i's factored layers back as they were saved (float32), and their measurements."""
        import torch
        from safetensors import safe_open

        from .models import set_module

        with safe_open(str(self._block_path(i)), "pt") as f:
            saved = json.loads(f.metadata()["stats"])
            for n in names:
                stats[n] = LayerStats(**saved[n])
                if not records[n].factored:
                    continue
                new = records[n].empty_module()
                state = {k: f.get_tensor(f"{n}.{k}").to(torch.float32) for k in new.state_dict()}
                new.load_state_dict(state, strict=True)
                set_module(model, n, new)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
