"""Measure the super-weight detector on one model (``python -m esa._detect_run --help``).

Prints one JSON object: the detector's report, the rank of each candidate under ``magnitude``
(|w| over all weight matrices), and token PPL on the first ``--windows`` windows of
``--length`` tokens of ``--data``: baseline, the primary candidate zeroed, all candidates zeroed,
one seeded random weight of the same tensor zeroed, and the super-activation controls.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from esa.analyses.detect import (
    detect_super_weights,
    random_weight_selection,
    rank_under_metric,
    super_activation_control,
)
from esa.data import load_text, make_windows
from esa.evaluate import evaluate
from esa.metrics.registry import compute_scores
from esa.models import load_model
from esa.perturb import perturbed


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m esa._detect_run")
    ap.add_argument("model", nargs="?", default="smollm2-135m")
    ap.add_argument("--data", default="/work/shared/data/wikitext-2-raw/wiki.test.raw")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threshold", type=float, default=50.0)
    ap.add_argument("--top", type=int, default=3)
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    lm = load_model(args.model)
    report = detect_super_weights(lm, threshold=args.threshold, top=args.top)
    out = {"model": args.model, "detector": report.to_dict()}
    if not report.candidates:
        print(json.dumps(out, indent=1))
        return out
    primary = max(report.candidates, key=lambda c: abs(c.output_activation))
    mag = compute_scores(lm, "magnitude", None, progress=False)
    out["magnitude_rank"] = {
        f"{c.layer}:{c.row}:{c.col}": rank_under_metric(mag, c.param_name, c.flat_index)
        for c in report.candidates
    }
    out["magnitude_entries"] = int(sum(s.numel() for s in mag.values()))
    del mag
    ids = make_windows(lm.tokenizer, load_text(args.data).text, args.length)[: args.windows]
    ppl = {}

    def ppl_of(selection=None):
        if selection is None:
            return evaluate(lm.model, ids, progress=False).ppl
        with perturbed(lm.model, selection, "zero"):
            return evaluate(lm.model, ids, progress=False).ppl

    sel_primary = {primary.param_name: torch.tensor([primary.flat_index])}
    ppl["baseline"] = ppl_of()
    ppl["zero_primary"] = ppl_of(sel_primary)
    ppl["zero_all_candidates"] = ppl_of(report.selection())
    rnd = random_weight_selection(lm, [primary], seed=args.seed)
    ppl["zero_random_same_tensor"] = ppl_of(rnd)
    out["random_weight"] = {n: [int(i) for i in v] for n, v in rnd.indices.items()}
    for positions in ("spike", "all"):
        ctl = super_activation_control(lm, primary, ids, positions=positions, spike_threshold=args.threshold)
        ppl[f"zero_primary_restore_{positions}"] = ctl.ppl_restored
        out[f"restore_{positions}_positions"] = [ctl.n_restored, ctl.n_positions]
    out["primary"] = f"layer {primary.layer} row {primary.row} col {primary.col}"
    out["ppl"] = ppl
    out["eval"] = {"data": args.data, "windows": int(ids.shape[0]), "length": args.length}
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
