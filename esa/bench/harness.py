"""The benchmark harness: one results dict, rewritten as JSON after every measurement; per-section
deadlines and error capture; synchronised timing; the loop that runs the chosen sections.

Every section runs under try/except (errors are recorded, the run goes on) and a time budget, so an
interrupted run still leaves its numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from esa.models import LoadedModel, load_model
from esa.util.files import atomic_write
from esa.util.runtime import free_memory, sync
from esa.util.serialize import jsonable

PEAK_BF16_FLOPS = 989.4e12  # H100/H200 SXM dense bf16 (datasheet), the MFU denominator
EVAL_ARCHS = ("pythia-1.4b", "llama-3.1-8b", "mistral-7b", "phi-3-mini")
RUNBOOK_METRICS = ("magnitude", "act_mag", "grad_x_weight", "grad_squared", "hutchinson_diag", "hessian_diag")
RUNBOOK_HESSIAN_TENSORS = r"(^|\.)(norm|final_layer_norm)\.weight$"  # the final norm of each arch
RUNBOOK_PERTURBATIONS = ("sign_flip", "zero", "gauss_noise", "bit_flip")
SECTIONS = (
    "env",
    "eval",
    "score",
    "accuracy",
    "hutchinson",
    "hessian",
    "select",
    "perturb",
    "runbook",
    "multi",
)
SECTION_S = {  # default seconds per section (--section-budgets overrides)
    "env": 30,
    "eval": 240,
    "score": 150,
    "accuracy": 120,
    "hutchinson": 150,
    "hessian": 120,
    "select": 60,
    "perturb": 45,
    "runbook": 590,
    "multi": 400,
}

T = TypeVar("T")


class Bench:
    """Results dict + JSON writer + run deadline; holds one model on the device at a time."""

    def __init__(self, out: str, args: argparse.Namespace):
        self.out = out
        self.args = args
        self.start = time.time()
        self.results: dict[str, Any] = {
            "meta": {
                "command": " ".join(["python -m esa.bench", *sys.argv[1:]]),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
            "sections": {},
        }
        self._lm: tuple[tuple[str, Any], LoadedModel] | None = None

    def save(self) -> None:
        """Rewrite the results JSON (atomically) with the elapsed time so far."""
        self.results["meta"]["elapsed_s"] = round(time.time() - self.start, 2)
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        atomic_write(Path(self.out), json.dumps(jsonable(self.results), indent=1))

    def left(self) -> float:
        return float(self.args.budget_s - (time.time() - self.start))

    def section(self, name: str) -> Section:
        return Section(self, name)

    def model(self, arch: str, device_map: Any = None) -> tuple[LoadedModel, float]:
        """(model, load seconds) of ``arch`` (``arch-<arch>`` unless a registry name); reuses the
        loaded one when ``(arch, device_map)`` is unchanged (load seconds 0 then)."""
        key = (arch, device_map)
        if self._lm is not None and self._lm[0] == key:
            return self._lm[1], 0.0
        self.drop_model()
        t = time.perf_counter()
        name = arch if arch.startswith(("arch-", "tiny-")) else f"arch-{arch}"
        lm = load_model(name, device=None if device_map else self.args.device, device_map=device_map)
        sync()
        seconds = time.perf_counter() - t
        self._lm = (key, lm)
        return lm, seconds

    def drop_model(self) -> None:
        self._lm = None
        free_memory()


class Section:
    """One section's rows and errors in ``bench.results["sections"][name]``, and its deadline:
    min(its budget, what is left of the run). A context manager that records its wall time and
    turns an exception into a recorded error."""

    def __init__(self, bench: Bench, name: str):
        self.bench, self.name = bench, name
        self.data = bench.results["sections"].setdefault(name, {"rows": [], "errors": []})
        self.deadline = time.time() + min(bench.args.section_s.get(name, 120), max(0.0, bench.left()))

    def left(self) -> float:
        return self.deadline - time.time()

    def row(self, **row: Any) -> dict[str, Any]:
        self.data["rows"].append(row)
        self.bench.save()
        return row

    def error(self, what: str, exc: BaseException) -> None:
        text = str(exc).strip()
        msg = f"{what}: {type(exc).__name__}: {text.splitlines()[0][:300] if text else ''}"
        self.data["errors"].append(msg)
        print(f"[bench] {self.name}: {msg}", flush=True)
        if self.bench.args.verbose:
            traceback.print_exc()
        self.bench.save()

    @contextlib.contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Record an exception of the block as an error of ``what`` and go on."""
        try:
            yield
        except Exception as exc:
            self.error(what, exc)
            free_memory()

    def __enter__(self) -> Section:
        t = time.time()
        self.data["started_s"] = round(t - self.bench.start, 1)
        print(f"[bench] section {self.name} (budget {self.left():.0f} s)", flush=True)
        self._t = t
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is not None and isinstance(exc, Exception):
            self.error("section", exc)
        self.data["seconds"] = round(time.time() - self._t, 2)
        self.bench.save()
        free_memory()
        return isinstance(exc, Exception)


def timed(fn: Callable[[], T], repeats: int = 3) -> tuple[float, T]:
    """(median seconds, last result) of ``repeats`` synchronised calls."""
    times: list[float] = []
    for _ in range(max(1, repeats)):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2], out


def vocab(lm: LoadedModel) -> int:
    model: Any = lm.model
    return int(model.config.vocab_size)


def mfu(params: int, tokens_per_s: float) -> float:
    """Model FLOPs utilisation of a forward pass: 2·params·tokens/s / PEAK_BF16_FLOPS."""
    return 2.0 * params * tokens_per_s / PEAK_BF16_FLOPS


def env_summary(bench: Bench) -> None:
    """The short environment record (versions, GPUs, date) for a run without the env section."""
    import transformers

    bench.results["meta"]["env"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "date": datetime.date.today().isoformat(),
    }


def run_sections(
    args: argparse.Namespace, sections: Sequence[str], runners: Mapping[str, Callable[[Bench], None]]
) -> Bench:
    """Run ``runners[name](bench)`` for each of ``sections`` in order while the run budget lasts
    (a section past it is recorded as skipped); a runner shared by several names (select and
    perturb) runs once. Returns the bench after the final save."""
    bench = Bench(args.out, args)
    bench.results["meta"]["sections"] = list(sections)
    bench.results["meta"]["args"] = {k: v for k, v in vars(args).items() if k != "report"}
    if "env" not in sections:
        env_summary(bench)
    shared = [r for r in runners.values() if list(runners.values()).count(r) > 1]
    done: list[Callable[[Bench], None]] = []
    for name in sections:
        if bench.left() < 5:
            bench.results["sections"].setdefault(name, {"rows": [], "errors": []})["errors"].append(
                "skipped: run budget spent"
            )
            continue
        runner = runners[name]
        if runner in done:
            continue
        if runner in shared:
            done.append(runner)
        runner(bench)
    bench.save()
    return bench
