"""The measurements behind ``esa detect``: the detector on one model and its PPL controls.

``detector_run`` detects the candidates (``detect_super_weights``), ranks each under
``magnitude`` (|w| over all scorable weights), and measures token PPL on ``eval_ids``: baseline,
the primary candidate (largest |output activation|) zeroed, all candidates zeroed, one seeded
random weight of the primary's tensor zeroed, and the primary zeroed with its super activation
restored at the spike positions and at all positions (``super_activation_control``).
"""

from __future__ import annotations

import time

import torch

from esa.analyses.detect import detect_super_weights
from esa.analyses.detect_controls import random_weight_selection, rank_under_metric, super_activation_control
from esa.evaluate import evaluate
from esa.metrics.registry import compute_scores
from esa.perturb import perturbed


def detector_run(
    lm, eval_ids: torch.Tensor, *, data: str, seed: int = 0, threshold: float = 50.0, top: int = 3, bos=False
) -> dict:
    """Plain-JSON measurements of the detector on ``lm`` (see the module doc); ``data`` names the
    text of ``eval_ids`` [n, L]; ``bos``: whether each window starts with BOS. Without a candidate only ``model`` and ``detector`` are given."""
    t0 = time.perf_counter()
    report = detect_super_weights(lm, threshold=threshold, top=top)
    out: dict = {"model": lm.name, "detector": report.to_dict()}
    if not report.candidates:
        return out
    primary = max(report.candidates, key=lambda c: abs(c.output_activation))
    mag = compute_scores(lm, "magnitude", None, progress=False)
    out["magnitude_rank"] = {
        f"{c.layer}:{c.row}:{c.col}": rank_under_metric(mag, c.param_name, c.flat_index)
        for c in report.candidates
    }
    out["magnitude_entries"] = int(sum(s.numel() for s in mag.values()))
    del mag

    def ppl_of(selection=None) -> float:
        if selection is None:
            return evaluate(lm.model, eval_ids, progress=False).ppl
        with perturbed(lm.model, selection, "zero"):
            return evaluate(lm.model, eval_ids, progress=False).ppl

    ppl = {
        "baseline": ppl_of(),
        "zero_primary": ppl_of({primary.param_name: torch.tensor([primary.flat_index])}),
        "zero_all_candidates": ppl_of(report.selection()),
    }
    rnd = random_weight_selection(lm, [primary], seed=seed)
    ppl["zero_random_same_tensor"] = ppl_of(rnd)
    out["random_weight"] = {n: [int(i) for i in v] for n, v in rnd.indices.items()}
    for positions in ("spike", "all"):
        ctl = super_activation_control(lm, primary, eval_ids, positions=positions, spike_threshold=threshold)
        ppl[f"zero_primary_restore_{positions}"] = ctl.ppl_restored
        out[f"restore_{positions}_positions"] = [ctl.n_restored, ctl.n_positions]
    out["primary"] = f"layer {primary.layer} row {primary.row} col {primary.col}"
    out["ppl"] = ppl
    out["eval"] = {
        "data": data,
        "windows": int(eval_ids.shape[0]),
        "length": int(eval_ids.shape[1]),
        "bos": bool(bos),
    }
    out["seconds"] = time.perf_counter() - t0
    return out
