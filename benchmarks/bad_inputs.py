"""Every bad input tests/test_cli.py::BAD_INPUTS checks, run once through the CLI: exit code and the one error line.

    python benchmarks/bad_inputs.py [--out benchmarks/results]

Writes bad_inputs.json and bad_inputs.md (what, exit, expected exit, the line printed, whether it is one `error:`
line that contains the expected text and nothing was written). The tests assert the same; this prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)

    from conftest import TINY_KINDS, build_tiny
    from test_cli import BAD_INPUTS, message_lines, run

    from compot_deploy.models import default_model_dir, quiet_transformers

    quiet_transformers()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dirs = {k: build_tiny(k, tmp / "tiny" / k, default_model_dir()) for k in TINY_KINDS}
        for i, (what, argv_of, code, message) in enumerate(BAD_INPUTS):
            case = tmp / f"case{i}"
            case.mkdir()
            out = case / "out"
            res = run(*argv_of(dirs, case, out))
            lines = message_lines(res.stderr)
            ok = (res.returncode == code and len(lines) == 1 and lines[0].startswith("error: ")
                  and message in lines[0] and not out.exists())
            rows.append({"what": what, "exit": res.returncode, "expected_exit": code,
                         "message": lines[0] if len(lines) == 1 else " / ".join(lines)[:400], "ok": ok})
            print(f"{'ok ' if ok else 'BAD'} exit {res.returncode}  {what}: {rows[-1]['message'][:110]}", flush=True)
    out_dir = Path(args.out)
    (out_dir / "bad_inputs.json").write_text(json.dumps(rows, indent=2) + "\n")
    md = ["# Bad inputs through the CLI (tests/test_cli.py::BAD_INPUTS)", "",
          "One `error:` line, the exit code (2: bad input, 3: a failed gate or verify), nothing written.", "",
          "| bad input | exit | message | as tested |", "|---|---:|---|---|"]
    md += [f"| {r['what']} | {r['exit']} | {r['message'].replace('|', '/')} | {'yes' if r['ok'] else 'NO'} |"
           for r in rows]
    (out_dir / "bad_inputs.md").write_text("\n".join(md) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
