"""CPU: ``esa eval`` load time and evaluation speed against plain transformers, same windows.

Usage (from the repository root): ``python bench/cpu_eval.py [--windows 8] [--length 512]``.

Five paths load smollm2-135m (SmolLM2-135M-Instruct, Q4_1 GGUF) and evaluate the same windows
(the first ``--windows`` windows of ``--length`` tokens of WikiText-2 test, no special tokens; the
tokenizers add no BOS), each in a fresh Python process so that every load is a first load in its
process (imports of torch/transformers/esa are paid before the clock starts):

- ``esa, GGUF cold``: ``load_model(file.gguf)`` with an empty esa cache (dequantize + write cache);
- ``esa, GGUF cached``: the same call again (reads the dequantized cache);
- ``esa, local HF dir``: ``load_model(DIR)`` (DIR = the same weights, ``save_pretrained``);
- ``plain, GGUF``: ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` + tokenizer;
- ``plain, local HF dir``: ``AutoModelForCausalLM.from_pretrained(DIR)`` + tokenizer.

esa evaluates with ``esa.evaluate.evaluate`` (what ``esa eval`` runs; batch 8); plain transformers
with a hand-written loop: ``model(input_ids=batch, labels=batch).loss`` under ``inference_mode``,
same batch size. tokens/s counts input tokens (windows x length) over the evaluation wall time;
load s is the wall time of the load call(s). transformers maps a safetensors file lazily, so a
plain load reads the weights only in the first forward, while esa's load reads every weight once
(its NaN/inf check): compare ``load + eval s``. ``load avg`` is the 1-minute load average of the
machine at the start of each measurement (other jobs running show as load above 0).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PATHS = ["esa-gguf-cold", "esa-gguf-cached", "esa-dir", "plain-gguf", "plain-dir"]
LABELS = {
    "esa-gguf-cold": "esa, GGUF cold (dequantize + cache)",
    "esa-gguf-cached": "esa, GGUF cached",
    "esa-dir": "esa, local HF dir",
    "plain-gguf": "plain transformers, GGUF",
    "plain-dir": "plain transformers, local HF dir",
}


def child(kind: str, gguf: str, hf_dir: str, data: str, windows: int, length: int, batch: int) -> dict:
    """One measurement in this (fresh) process; returns plain numbers."""
    import torch
    import transformers  # noqa: F401  (imported before the clock starts)

    import esa.models  # noqa: F401

    torch.set_num_threads(os.cpu_count() or 1)
    load_avg = os.getloadavg()[0]
    t0 = time.perf_counter()
    if kind.startswith("esa"):
        from esa.models import load_model

        lm = load_model(gguf if "gguf" in kind else hf_dir, device="cpu")
        model, tokenizer = lm.model, lm.tokenizer
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        where, extra = (
            (str(Path(gguf).parent), {"gguf_file": Path(gguf).name}) if "gguf" in kind else (hf_dir, {})
        )
        model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **extra).eval()
        tokenizer = AutoTokenizer.from_pretrained(where, **extra)
    load_s = time.perf_counter() - t0
    text = Path(data).read_text(encoding="utf-8")
    if kind.startswith("esa"):
        from esa.data import prepare_data
        from esa.evaluate import evaluate

        ids = prepare_data(tokenizer, data, None, length, windows, min_calib_windows=0).eval_ids
        res = evaluate(model, ids, batch, progress=False)
        ppl, eval_s = res.ppl, res.seconds
    else:
        flat = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids = flat[: windows * length].view(windows, length)
        t = time.perf_counter()
        total = 0.0
        with torch.inference_mode():
            for i in range(0, windows, batch):
                part = ids[i : i + batch]
                total += float(model(input_ids=part, labels=part).loss) * part.shape[0] * (length - 1)
        eval_s = time.perf_counter() - t
        ppl = math.exp(total / (windows * (length - 1)))
    digest = hashlib.sha256(ids.numpy().tobytes()).hexdigest()[:12]
    return {
        "path": kind,
        "load_s": load_s,
        "eval_s": eval_s,
        "tokens_per_s": ids.numel() / eval_s,
        "ppl": ppl,
        "windows_sha256": digest,
        "load_avg_1m": load_avg,
    }


def run(kind: str, env: dict, args, gguf: Path, hf_dir: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--gguf", str(gguf), "--hf-dir", str(hf_dir)]
    cmd += ["--data", args.data, "--windows", str(args.windows), "--length", str(args.length)]
    cmd += ["--batch", str(args.batch)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict], args) -> str:
    plain = {r["path"].split("-", 1)[1]: r for r in rows if r["path"].startswith("plain")}
    out = [
        f"| path (smollm2-135m, {args.windows} x {args.length} tokens, batch {args.batch}) | load s"
        " | load + eval s | eval tok/s | tok/s vs plain (same source) | PPL | load avg |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ref = plain.get("gguf" if "gguf" in r["path"] else "dir")
        ratio = f"x{r['tokens_per_s'] / ref['tokens_per_s']:.2f}" if ref and ref is not r else "–"
        out.append(
            f"| {LABELS[r['path']]} | {r['load_s']:.1f} | {r['load_s'] + r['eval_s']:.1f}"
            f" | {r['tokens_per_s']:.0f} | {ratio} | {r['ppl']:.4f}"
            f" | {r['load_avg_1m']:.1f} |"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    p.add_argument("--gguf", default=None, help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--data", default=None, help="evaluation text (default: ../shared/data WikiText-2 test)")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = p.parse_args()
    if args.child:
        row = child(args.child, args.gguf, args.hf_dir, args.data, args.windows, args.length, args.batch)
        print(json.dumps(row))
        return
    from esa.data import default_data_file
    from esa.models import load_model
    from esa.models.embedded import gguf_path

    args.data = args.data or str(default_data_file("test") or "")
    if not args.data:
        raise SystemExit("no WikiText-2 test file under ../shared/data: pass --data FILE")
    with tempfile.TemporaryDirectory() as tmp:
        gguf = Path(tmp) / "gguf" / gguf_path().name
        gguf.parent.mkdir()
        shutil.copyfile(gguf_path(), gguf)
        hf_dir = Path(tmp) / "smollm2-135m"
        lm = load_model("smollm2-135m", device="cpu")  # the same weights as a local HF directory
        lm.model.save_pretrained(hf_dir)
        lm.tokenizer.save_pretrained(hf_dir)
        del lm
        env = {**os.environ, "ESA_CACHE_DIR": str(Path(tmp) / "cache"), "TQDM_DISABLE": "1"}
        rows = [run(kind, env, args, gguf, hf_dir) for kind in PATHS]
    if len({r["windows_sha256"] for r in rows}) != 1:
        raise SystemExit(f"the paths evaluated different windows: {rows}")
    import torch
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {os.cpu_count()} CPU cores")
    print(table(rows, args))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
