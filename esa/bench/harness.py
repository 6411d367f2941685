"""Speed and memory benchmark: plain transformers vs esa's own code paths, side by side.

``python -m esa.bench.harness`` times, on random-init models of the published architectures (esa.models.archs):

- ``eval``: evaluation forward (tokens/s, MFU against 2·params·tokens, peak memory), plain
  transformers (``model(input_ids, labels=...)``, bf16, sdpa) vs ``esa.evaluate.evaluate``;
- ``score``: the scoring pass (grad_x_weight, grad_squared over N calibration windows) vs a plain
  ``loss.backward()`` loop; tokens/s and peak memory (fp32 scores, and bf16 lean scores at 8B);
- ``hutchinson``: hutchinson_diag cost per Rademacher sample (1.4B, and 8B if it fits);
- ``select``: per-layer and global top-k (k=100/300) over all weights of the 8B model: time and
  extra memory; ``perturb``: perturb + restore (verified) of those selections;
- ``runbook``: the research runbook v2 end to end (``esa.experiment.run_experiment``);
- ``multi``: a model split over several GPUs (Mixtral-8x7B): evaluation and grad_x_weight scoring.

Every section runs under try/except (errors are recorded, the run goes on) and a time budget, and
the JSON is rewritten after each measurement, so an interrupted run still leaves its numbers.
The same code paths serve ``esa run``: nothing here is a benchmark-only fast path.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import traceback

import torch

from esa.util.runtime import GIB, free_memory, peak_gpu_bytes, peaks_per_gpu, reset_peak, sync
from esa.util.serialize import jsonable

PEAK_BF16_FLOPS = 989.4e12  # H100/H200 SXM dense bf16 (datasheet), the MFU denominator
EVAL_ARCHS = ("pythia-1.4b", "llama-3.1-8b", "mistral-7b", "phi-3-mini")
RUNBOOK_METRICS = ("magnitude", "act_mag", "grad_x_weight", "grad_squared")
RUNBOOK_PERTURBATIONS = ("sign_flip", "zero", "gauss_noise", "bit_flip")
SECTIONS = ("env", "eval", "score", "hutchinson", "select", "perturb", "runbook", "multi")


# --- plumbing -------------------------------------------------------------------------------


class Bench:
    """Results dict + JSON writer + deadlines."""

    def __init__(self, out: str, args):
        self.out = out
        self.args = args
        self.start = time.time()
        self.results: dict = {
            "meta": {
                "command": " ".join(["python -m esa.bench.harness"] + sys.argv[1:]),
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
            "sections": {},
        }
        self._lm = None

    def save(self) -> None:
        self.results["meta"]["elapsed_s"] = round(time.time() - self.start, 2)
        os.makedirs(os.path.dirname(os.path.abspath(self.out)), exist_ok=True)
        tmp = self.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(jsonable(self.results), fh, indent=1)
        os.replace(tmp, self.out)

    def left(self) -> float:
        return self.args.budget_s - (time.time() - self.start)

    def section(self, name: str):
        return _Section(self, name)

    # one model at a time on the device
    def model(self, arch: str, device_map=None):
        from esa.models import load_model

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


class _Section:
    def __init__(self, bench: Bench, name: str):
        self.bench, self.name = bench, name
        self.data = bench.results["sections"].setdefault(name, {"rows": [], "errors": []})
        self.deadline = time.time() + min(bench.args.section_s.get(name, 120), max(0.0, bench.left()))

    def left(self) -> float:
        return self.deadline - time.time()

    def row(self, **row) -> dict:
        self.data["rows"].append(row)
        self.bench.save()
        return row

    def error(self, what: str, exc: BaseException) -> None:
        msg = f"{what}: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        self.data["errors"].append(msg)
        print(f"[bench] {self.name}: {msg}", flush=True)
        if self.bench.args.verbose:
            traceback.print_exc()
        self.bench.save()

    @contextlib.contextmanager
    def guard(self, what: str):
        try:
            yield
        except Exception as exc:
            self.error(what, exc)
            free_memory()

    def __enter__(self):
        t = time.time()
        self.data["started_s"] = round(t - self.bench.start, 1)
        print(f"[bench] section {self.name} (budget {self.left():.0f} s)", flush=True)
        self._t = t
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is not None and isinstance(exc, Exception):
            self.error("section", exc)
        self.data["seconds"] = round(time.time() - self._t, 2)
        self.bench.save()
        free_memory()
        return isinstance(exc, Exception)


def _timed(fn, repeats: int = 3):
    """(median seconds, last result) of ``repeats`` synchronised calls."""
    times, out = [], None
    for _ in range(max(1, repeats)):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2], out


def _vocab(lm) -> int:
    return int(lm.model.config.vocab_size)


def _mfu(params: int, tokens_per_s: float) -> float:
    return 2.0 * params * tokens_per_s / PEAK_BF16_FLOPS


# --- plain transformers references ---------------------------------------------------------


def plain_eval(model, windows: torch.Tensor, batch_size: int, labels: bool = True) -> float:
    """Mean loss with plain transformers: ``model(input_ids, labels=input_ids)`` per batch (full
    logits, transformers' own upcast loss), bf16 and the model's attention kernel (sdpa)."""
    device = model.get_input_embeddings().weight.device
    ids = windows.to(device)
    total = None
    with torch.inference_mode():
        for i in range(0, ids.shape[0], batch_size):
            b = ids[i : i + batch_size]
            out = model(input_ids=b, labels=b if labels else None, use_cache=False)
            val = out.loss.float() * b.shape[0] if labels else out.logits[:, -1, 0].float().sum()
            total = val if total is None else total + val
    return float(total) / ids.shape[0]


def plain_grad_x_weight(lm, calib: torch.Tensor, batch_size: int, names) -> None:
    """grad_x_weight the plain way: ``loss.backward()`` per batch into ``.grad`` (bf16), no
    checkpointing, then |w * grad| in fp32 per tensor."""
    model = lm.model
    named = dict(model.named_parameters())
    wanted = set(names)
    flags = {n: p.requires_grad for n, p in named.items()}
    device = model.get_input_embeddings().weight.device
    ids = calib.to(device)
    try:
        for n, p in named.items():
            p.requires_grad_(n in wanted)
        for i in range(0, ids.shape[0], batch_size):
            b = ids[i : i + batch_size]
            loss = model(input_ids=b, labels=b, use_cache=False).loss * (b.shape[0] / ids.shape[0])
            loss.backward()
        scores = {
            n: (named[n].detach().float() * named[n].grad.float()).abs()
            for n in names
            if named[n].grad is not None
        }
        del scores
    finally:
        for n, p in named.items():
            p.grad = None
            p.requires_grad_(flags[n])


# --- sections ------------------------------------------------------------------------------


def section_env(bench: Bench) -> None:
    import transformers

    with bench.section("env") as sec:
        info = {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.version.cuda,
            "platform": platform.platform(),
            "gpus": [],
            "date": datetime.date.today().isoformat(),
        }
        with contextlib.suppress(Exception):
            import accelerate

            info["accelerate"] = accelerate.__version__
        if torch.cuda.is_available():
            info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            info["gpu_memory_gib"] = [
                round(torch.cuda.get_device_properties(i).total_memory / GIB, 1)
                for i in range(torch.cuda.device_count())
            ]
            with sec.guard("gemm"):
                n = 8192
                a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
                b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
                for _ in range(3):
                    a @ b
                secs, _ = _timed(lambda: [a @ b for _ in range(20)], repeats=3)
                info["gemm_bf16_tflops"] = round(2 * n**3 * 20 / secs / 1e12, 1)
                x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
                y = torch.empty_like(x)
                secs, _ = _timed(lambda: [y.copy_(x) for _ in range(10)], repeats=3)
                info["copy_gb_s"] = round(2 * (1 << 30) * 10 / secs / 1e9, 1)
                del a, b, x, y
        sec.data["info"] = info
        bench.results["meta"]["env"] = info


def section_eval(bench: Bench) -> None:
    from esa.data import random_windows
    from esa.evaluate import auto_batch_size, evaluate

    args = bench.args
    with bench.section("eval") as sec:
        for arch in args.eval_archs:
            if sec.left() < 20:
                sec.error(arch, TimeoutError("section budget spent"))
                break
            with sec.guard(arch):
                lm, load_s = bench.model(arch)
                params = lm.num_parameters
                n = args.eval_windows if "1.4b" not in arch else 2 * args.eval_windows
                windows = random_windows(n, args.length, _vocab(lm), seed=1)
                bs = auto_batch_size(lm.model, n, args.length, 8)
                tokens = windows.numel()
                row = {
                    "arch": arch,
                    "params": params,
                    "load_s": round(load_s, 2),
                    "windows": n,
                    "length": args.length,
                    "batch_size": bs,
                    "attn": getattr(lm.model.config, "_attn_implementation", None),
                }
                # plain transformers (labels: the upcast full-logits loss)
                plain_eval(lm.model, windows[:bs], bs)  # warm-up
                base = reset_peak()
                secs, plain_loss = _timed(lambda: plain_eval(lm.model, windows, bs), args.repeats)
                row.update(
                    plain_tok_s=tokens / secs,
                    plain_peak_gib=(peak_gpu_bytes() - 0) / GIB,
                    plain_extra_gib=(peak_gpu_bytes() - base) / GIB,
                    plain_loss=plain_loss,
                )
                # plain forward without labels (logits only), for reference
                base = reset_peak()
                secs, _ = _timed(lambda: plain_eval(lm.model, windows, bs, labels=False), args.repeats)
                row.update(plain_logits_tok_s=tokens / secs)
                # esa, eager
                evaluate(lm.model, windows[:bs], bs, progress=False, compile=False)  # warm-up
                secs, res = _timed(
                    lambda: evaluate(lm.model, windows, bs, progress=False, compile=False), args.repeats
                )
                row.update(
                    esa_eager_tok_s=tokens / secs,
                    esa_eager_peak_gib=res.peak_memory_bytes / GIB,
                    esa_eager_nll_diff=abs(res.nll - plain_loss),
                )
                # esa, its default (compiled on CUDA for models >= 100M params)
                from esa.evaluate import use_compile

                row["esa_compiled"] = use_compile(lm.model, None)
                t = time.perf_counter()
                evaluate(lm.model, windows[:bs], bs, progress=False)  # warm-up (compiles)
                sync()
                row["warmup_s"] = time.perf_counter() - t
                secs, res = _timed(lambda: evaluate(lm.model, windows, bs, progress=False), args.repeats)
                row.update(
                    esa_tok_s=tokens / secs,
                    esa_peak_gib=res.peak_memory_bytes / GIB,
                    esa_nll=res.nll,
                    nll_abs_diff=abs(res.nll - plain_loss),
                )
                row["compile_failed"] = bool(lm.model.__dict__.get("_esa_compile_failed"))
                row["ratio"] = row["esa_tok_s"] / row["plain_tok_s"]
                row["eager_ratio"] = row["esa_eager_tok_s"] / row["plain_tok_s"]
                row["plain_mfu"] = _mfu(params, row["plain_tok_s"])
                row["esa_mfu"] = _mfu(params, row["esa_tok_s"])
                if row["esa_compiled"]:
                    with sec.guard(f"{arch} compiled sees perturbations"):
                        row["compiled_sees_perturbation"] = _compiled_sees_perturbation(lm, windows[:bs], bs)
                sec.row(**row)
                print(
                    f"[bench] eval {arch}: plain {row['plain_tok_s']:.0f} esa {row['esa_tok_s']:.0f} tok/s "
                    f"(x{row['ratio']:.2f}; compiled={row['esa_compiled']}) eager {row['esa_eager_tok_s']:.0f}",
                    flush=True,
                )
            bench.drop_model()


def _compiled_sees_perturbation(lm, windows, bs) -> dict:
    """Scale one MLP weight x300 in place: compiled and eager evaluation must both see it, equally."""
    from esa.evaluate import evaluate
    from esa.perturb import perturbed

    name = [n for n in lm.param_map.scorable() if lm.param_map[n].component == "mlp_down"][0]
    numel = dict(lm.model.named_parameters())[name].numel()
    base = evaluate(lm.model, windows, bs, progress=False).nll
    with perturbed(lm.model, {name: torch.arange(numel)}, "scale", scale=300.0):
        compiled = evaluate(lm.model, windows, bs, progress=False, compile=True).nll
        eager = evaluate(lm.model, windows, bs, progress=False, compile=False).nll
    after = evaluate(lm.model, windows, bs, progress=False).nll
    return {
        "tensor": name,
        "base": base,
        "compiled": compiled,
        "eager": eager,
        "restored": after,
        "ok": abs(eager - base) > 1e-4
        and abs(compiled - eager) < 0.25 * abs(eager - base)
        and abs(after - base) < 1e-6,
    }


def section_score(bench: Bench) -> None:
    from esa.data import random_windows
    from esa.metrics.registry import compute_scores

    args = bench.args
    with bench.section("score") as sec:
        for arch in args.score_archs:
            if sec.left() < 20:
                sec.error(arch, TimeoutError("section budget spent"))
                break
            lm, _ = bench.model(arch)
            names = lm.param_map.scorable()
            calib = random_windows(args.calib_windows, args.length, _vocab(lm), seed=2)
            tokens = calib.numel()
            bs = args.score_batch
            weights_gib = sum(p.numel() * p.element_size() for p in lm.model.parameters()) / GIB
            variants = [
                ("plain grad_x_weight (loss.backward, bf16 .grad)", None, None),
                ("esa grad_x_weight fp32", "grad_x_weight", torch.float32),
                ("esa grad_squared fp32", "grad_squared", torch.float32),
            ]
            if "8b" in arch or "7b" in arch:
                variants.append(("esa grad_x_weight bf16 (lean)", "grad_x_weight", torch.bfloat16))
                variants.append(("esa grad_x_weight fp32, checkpoint=False", "grad_x_weight", "nockpt"))
            with sec.guard(f"{arch} warm-up"):  # untimed: first backward kernels and handles
                del_ = compute_scores(lm, "grad_x_weight", calib[:bs], batch_size=bs, progress=False)
                del del_
                plain_grad_x_weight(lm, calib[:bs], bs, names)
                free_memory()
            for label, metric, dtype in variants:
                if sec.left() < 10:
                    break
                with sec.guard(f"{arch} {label}"):
                    base = reset_peak()
                    t = time.perf_counter()
                    if metric is None:
                        plain_grad_x_weight(lm, calib, bs, names)
                        ckpt = False
                    else:
                        from esa.metrics import registry as M

                        force = False if dtype == "nockpt" else None
                        dtype = torch.float32 if dtype == "nockpt" else dtype
                        ckpt = (
                            force
                            if force is not None
                            else M._needs_checkpointing(
                                M._context(
                                    lm,
                                    M.METRICS[metric],
                                    calib,
                                    names,
                                    seed=0,
                                    batch_size=bs,
                                    hutchinson_samples=1,
                                    progress=False,
                                    max_entries=1,
                                    desc="",
                                    score_dtype=dtype,
                                    checkpoint=None,
                                )
                            )
                        )
                        scores = compute_scores(
                            lm,
                            metric,
                            calib,
                            batch_size=bs,
                            progress=False,
                            score_dtype=dtype,
                            checkpoint=force,
                        )
                        finite = all(bool(torch.isfinite(s).all()) for s in scores.values())
                        del scores
                    sync()
                    secs = time.perf_counter() - t
                    row = sec.row(
                        arch=arch,
                        variant=label,
                        windows=int(calib.shape[0]),
                        batch_size=bs,
                        tok_s=tokens / secs,
                        seconds=secs,
                        peak_gib=peak_gpu_bytes() / GIB,
                        extra_gib=(peak_gpu_bytes() - base) / GIB,
                        weights_gib=weights_gib,
                        checkpointing=ckpt,
                        **({} if metric is None else {"finite": finite}),
                    )
                    print(
                        f"[bench] score {arch} {label}: {row['tok_s']:.0f} tok/s peak {row['peak_gib']:.1f} GiB",
                        flush=True,
                    )
                free_memory()
        bench.drop_model()


def section_hutchinson(bench: Bench) -> None:
    from esa.data import random_windows
    from esa.metrics.registry import compute_scores

    args = bench.args
    with bench.section("hutchinson") as sec:
        for arch in args.hutchinson_archs:
            if sec.left() < 20:
                sec.error(arch, TimeoutError("section budget spent"))
                break
            with sec.guard(arch):
                lm, _ = bench.model(arch)
                calib = random_windows(args.hutchinson_windows, args.length, _vocab(lm), seed=3)
                out = {"arch": arch, "windows": int(calib.shape[0]), "length": args.length}
                times = {}
                del_ = compute_scores(
                    lm, "hutchinson_diag", calib[:1], batch_size=1, hutchinson_samples=1, progress=False
                )  # warm-up (kernels, handles), untimed
                del del_
                free_memory()
                for samples in (1, 2):
                    reset_peak()
                    t = time.perf_counter()
                    s = compute_scores(
                        lm,
                        "hutchinson_diag",
                        calib,
                        batch_size=calib.shape[0],
                        hutchinson_samples=samples,
                        progress=False,
                    )
                    del s
                    sync()
                    times[samples] = time.perf_counter() - t
                    out[f"seconds_{samples}_samples"] = times[samples]
                    out[f"peak_gib_{samples}_samples"] = peak_gpu_bytes() / GIB
                    free_memory()
                    if sec.left() < 5:
                        break
                if 2 in times:
                    out["seconds_per_sample"] = times[2] - times[1]
                    out["fixed_seconds"] = times[1] - out["seconds_per_sample"]
                sec.row(**out)
                print(f"[bench] hutchinson {arch}: {out}", flush=True)
            bench.drop_model()


def section_select_perturb(bench: Bench) -> None:
    from esa.metrics.registry import compute_scores
    from esa.perturb import perturbed
    from esa.select import select

    args = bench.args
    arch = args.select_arch
    selections = {}
    with bench.section("select") as sec:
        lm, _ = bench.model(arch)
        names = lm.param_map.scorable(include_embeddings=True)
        scores = compute_scores(lm, "magnitude", None, names=names, progress=False)
        entries = sum(s.numel() for s in scores.values())
        sec.data["entries"] = entries
        sec.data["tensors"] = len(scores)
        sec.data["scores_gib"] = sum(s.numel() * s.element_size() for s in scores.values()) / GIB
        for mode in ("per_layer", "global"):
            for k in (100, 300):
                for kind in ("top", "bottom", "random") if k == 300 else ("top",):
                    with sec.guard(f"{mode} k={k} {kind}"):
                        select(scores, k, kind, mode)  # warm-up (kernels, allocator)
                        base = reset_peak()
                        secs, sel = _timed(lambda s=scores, k=k, kind=kind, m=mode: select(s, k, kind, m), 1)
                        sec.row(
                            arch=arch,
                            mode=mode,
                            k=k,
                            kind=kind,
                            seconds=secs,
                            entries=entries,
                            selected=sel.size,
                            extra_gib=(peak_gpu_bytes() - base) / GIB,
                        )
                        selections[(mode, k, kind)] = sel
        del scores
        free_memory()
    with bench.section("perturb") as sec:
        lm, _ = bench.model(arch)
        for (mode, k, kind), sel in selections.items():
            if kind != "top":
                continue
            for method in RUNBOOK_PERTURBATIONS:
                with sec.guard(f"{mode} {k} {method}"):
                    scale = 0.01 if method == "gauss_noise" else None

                    def run():
                        with perturbed(lm.model, sel, method, scale=scale, seed=0) as info:
                            sync()
                        return info

                    run()
                    base = reset_peak()
                    secs, info = _timed(run, 3)
                    sec.row(
                        arch=arch,
                        mode=mode,
                        k=k,
                        method=method,
                        n_selected=info.n_selected,
                        n_changed=info.n_changed,
                        tensors=len(info.params),
                        verified=info.verified,
                        seconds=secs,
                        extra_gib=(peak_gpu_bytes() - base) / GIB,
                    )
    bench.drop_model()


def section_runbook(bench: Bench) -> None:
    from esa.data import random_data
    from esa.runbook.experiment import ExperimentConfig, run_experiment

    args = bench.args
    with bench.section("runbook") as sec:
        bench.drop_model()
        t = time.perf_counter()
        lm, load_s = bench.model(args.runbook_arch)
        data = random_data(_vocab(lm), args.runbook_windows, 3 * args.runbook_calib, args.length, seed=5)
        with tempfile.TemporaryDirectory() as tmp:
            config = ExperimentConfig(
                model=lm.name,
                out_dir=os.path.join(tmp, "run"),
                metrics=list(args.runbook_metrics),
                mode="per_layer",
                topk=100,
                max_samples=args.runbook_windows,
                max_length=args.length,
                batch_size=8,
                calib_samples=args.runbook_calib,
                seeds=[0, 1, 2],
                perturbations=list(RUNBOOK_PERTURBATIONS),
                controls=["random_k", "bottom_k"],
                use_cache=False,
                progress=args.progress,
                compile=args.runbook_compile,
                score_dtype=args.runbook_score_dtype,
            )
            result = run_experiment(config, lm=lm, data=data)
            wall = time.perf_counter() - t
            files = sorted(os.listdir(result.out_dir)) if result.out_dir else []
        sec.data["config"] = config.to_dict()
        sec.data["timings"] = result.timings
        sec.data["memory_gib"] = {k: v / GIB for k, v in result.memory.items()}
        sec.data["baseline"] = result.baseline
        sec.data["artifacts"] = files
        phase = {
            "score_s": sum(v for k, v in result.timings.items() if k.startswith("score_")),
            "perturb_eval_s": sum(v for k, v in result.timings.items() if k.startswith("perturb_")),
        }
        sec.row(
            arch=args.runbook_arch,
            wall_s=wall,
            load_s=load_s,
            total_s=result.timings["total_s"],
            eval_windows=args.runbook_windows,
            calib_windows=args.runbook_calib,
            length=args.length,
            metrics=list(args.runbook_metrics),
            conditions=len(result.rows),
            evals_reused=result.timings.get("evals_reused"),
            eval_batch_size=result.timings.get("eval_batch_size"),
            baseline_tok_s=result.baseline["tokens_per_s"],
            peak_gib=max(result.memory.values()) / GIB if result.memory else 0.0,
            **phase,
        )
        print(f"[bench] runbook: {wall:.1f} s wall, {len(result.rows)} conditions", flush=True)
    bench.drop_model()


def section_multi(bench: Bench) -> None:
    from esa.data import random_windows
    from esa.evaluate import auto_batch_size, evaluate
    from esa.metrics.registry import compute_scores

    args = bench.args
    with bench.section("multi") as sec:
        n_gpu = torch.cuda.device_count()
        sec.data["gpus"] = n_gpu
        if n_gpu < 2:
            sec.error(args.multi_arch, RuntimeError(f"needs 2+ GPUs, {n_gpu} visible"))
            return
        bench.drop_model()
        lm, load_s = bench.model(args.multi_arch, device_map="auto")
        sec.data["device_map"] = sorted({str(p.device) for p in lm.model.parameters()})
        sec.data["weights_gib_per_gpu"] = [
            round(torch.cuda.memory_allocated(i) / GIB, 2) for i in range(n_gpu)
        ]
        params = lm.num_parameters
        n = args.multi_windows
        windows = random_windows(n, args.length, _vocab(lm), seed=6)
        bs = auto_batch_size(lm.model, n, args.length, 8)
        tokens = windows.numel()
        with sec.guard("eval"):
            plain_eval(lm.model, windows[:bs], bs)
            reset_peak()
            secs, plain_loss = _timed(lambda: plain_eval(lm.model, windows, bs), 1)
            plain = {"tok_s": tokens / secs, "peak_gib_per_gpu": peaks_per_gpu()}
            evaluate(lm.model, windows[:bs], bs, progress=False)
            reset_peak()
            secs, res = _timed(lambda: evaluate(lm.model, windows, bs, progress=False), 1)
            sec.row(
                arch=args.multi_arch,
                part="eval",
                params=params,
                load_s=load_s,
                windows=n,
                batch_size=bs,
                plain_tok_s=plain["tok_s"],
                plain_peak_gib_per_gpu=plain["peak_gib_per_gpu"],
                esa_tok_s=tokens / secs,
                esa_peak_gib_per_gpu=peaks_per_gpu(),
                ratio=tokens / secs / plain["tok_s"],
                nll_abs_diff=abs(res.nll - plain_loss),
            )
        calib = random_windows(args.multi_calib, args.length, _vocab(lm), seed=7)
        for dtype in (torch.bfloat16, torch.float32):
            if sec.left() < 30:
                break
            with sec.guard(f"grad_x_weight {dtype}"):
                reset_peak()
                t = time.perf_counter()
                scores = compute_scores(
                    lm, "grad_x_weight", calib, batch_size=args.score_batch, progress=False, score_dtype=dtype
                )
                sync()
                secs = time.perf_counter() - t
                finite = all(bool(torch.isfinite(s).all()) for s in scores.values())
                del scores
                sec.row(
                    arch=args.multi_arch,
                    part=f"grad_x_weight {str(dtype).replace('torch.', '')}",
                    windows=int(calib.shape[0]),
                    batch_size=args.score_batch,
                    seconds=secs,
                    tok_s=calib.numel() / secs,
                    peak_gib_per_gpu=peaks_per_gpu(),
                    finite=finite,
                )
            free_memory()
    bench.drop_model()


# --- report ---------------------------------------------------------------------------------


def _f(value, fmt="{:,.0f}"):
    if value is None or value == "":
        return "–"
    try:
        return fmt.format(value)
    except (TypeError, ValueError):
        return str(value)


def markdown(results: dict) -> str:
    """The BENCHMARKS.md tables of one results dict."""
    s = results.get("sections", {})
    lines = []
    ev = s.get("eval", {}).get("rows", [])
    if ev:
        lines += [
            "### Evaluation forward (bf16, sdpa, 512-token windows)",
            "",
            "| architecture | params | batch | plain tok/s | esa tok/s | esa / plain | plain MFU | esa MFU "
            "| esa eager tok/s (/ plain) | compiled | warm-up s | plain peak GiB | esa peak GiB | |ΔNLL| |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
        ]
        for r in ev:
            eager = (
                f"{r['esa_eager_tok_s']:,.0f} (x{r['eager_ratio']:.2f})" if "esa_eager_tok_s" in r else "–"
            )
            lines.append(
                f"| {r['arch']} | {r['params'] / 1e9:.2f} B | {r['batch_size']} | {_f(r['plain_tok_s'])} "
                f"| {_f(r['esa_tok_s'])} | x{r['ratio']:.2f} | {r['plain_mfu']:.0%} | {r['esa_mfu']:.0%} "
                f"| {eager} | {r.get('esa_compiled')} | {_f(r.get('warmup_s'), '{:.1f}')} "
                f"| {r['plain_peak_gib']:.1f} | {r['esa_peak_gib']:.1f} | {r['nll_abs_diff']:.1e} |"
            )
        lines.append("")
    sc = s.get("score", {}).get("rows", [])
    if sc:
        lines += [
            "### Scoring pass (calibration windows of 512 tokens)",
            "",
            "| architecture | variant | windows | batch | tok/s | seconds | peak GiB | checkpointing |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        plain = {r["arch"]: r for r in sc if r["variant"].startswith("plain")}
        for r in sc:
            ratio = ""
            if r["arch"] in plain and not r["variant"].startswith("plain"):
                ratio = f" (x{r['tok_s'] / plain[r['arch']]['tok_s']:.2f})"
            lines.append(
                f"| {r['arch']} | {r['variant']} | {r['windows']} | {r['batch_size']} | {_f(r['tok_s'])}{ratio} "
                f"| {r['seconds']:.1f} | {r['peak_gib']:.1f} | {r['checkpointing']} |"
            )
        lines.append("")
    hu = s.get("hutchinson", {}).get("rows", [])
    if hu:
        lines += [
            "### hutchinson_diag cost",
            "",
            "| architecture | windows x tokens | s (1 sample) | s (2 samples) | s per sample | peak GiB |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in hu:
            lines.append(
                f"| {r['arch']} | {r['windows']} x {r['length']} | {_f(r.get('seconds_1_samples'), '{:.2f}')} "
                f"| {_f(r.get('seconds_2_samples'), '{:.2f}')} | {_f(r.get('seconds_per_sample'), '{:.2f}')} "
                f"| {_f(r.get('peak_gib_2_samples', r.get('peak_gib_1_samples')), '{:.1f}')} |"
            )
        lines.append("")
    se = s.get("select", {}).get("rows", [])
    if se:
        lines += [
            f"### Selection over all {se[0]['entries'] / 1e9:.2f} B weights ({se[0]['arch']})",
            "",
            "| mode | k | kind | seconds | extra GiB |",
            "|---|---:|---|---:|---:|",
        ]
        for r in se:
            lines.append(
                f"| {r['mode']} | {r['k']} | {r['kind']} | {r['seconds']:.3f} | {r['extra_gib']:.3f} |"
            )
        lines.append("")
    pe = s.get("perturb", {}).get("rows", [])
    if pe:
        lines += [
            "### Perturb + restore (bit-exact, verified)",
            "",
            "| selection | method | entries | tensors | seconds | extra GiB |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in pe:
            lines.append(
                f"| {r['mode']} k={r['k']} | {r['method']} | {r['n_selected']} | {r['tensors']} "
                f"| {r['seconds']:.3f} | {r['extra_gib']:.3f} |"
            )
        lines.append("")
    rb = s.get("runbook", {}).get("rows", [])
    if rb:
        lines += [
            "### Runbook v2 end to end",
            "",
            "| architecture | eval windows | calib windows | conditions | evals reused | score s "
            "| perturb+eval s | total s | wall s | peak GiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in rb:
            lines.append(
                f"| {r['arch']} | {r['eval_windows']} | {r['calib_windows']} | {r['conditions']} "
                f"| {r['evals_reused']} | {r['score_s']:.0f} | {r['perturb_eval_s']:.0f} | {r['total_s']:.0f} "
                f"| {r['wall_s']:.0f} | {r['peak_gib']:.1f} |"
            )
        lines.append("")
    mu = s.get("multi", {}).get("rows", [])
    if mu:
        lines += ["### Several GPUs (device_map)", "", "| architecture | part | numbers |", "|---|---|---|"]
        for r in mu:
            keep = {
                k: (round(v, 3) if isinstance(v, float) else v)
                for k, v in r.items()
                if k not in ("arch", "part")
            }
            lines.append(f"| {r['arch']} | {r['part']} | {json.dumps(keep)} |")
        lines.append("")
    errors = [(name, e) for name, sec in s.items() for e in sec.get("errors", [])]
    if errors:
        lines += ["Errors recorded:", ""] + [f"- {name}: {e}" for name, e in errors] + [""]
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m esa.bench.harness", description=__doc__.splitlines()[0])
    p.add_argument(
        "--sections",
        default="env,eval,score,hutchinson,select,perturb",
        help=f"comma-separated, from {','.join(SECTIONS)} (default: all single-GPU but runbook)",
    )
    p.add_argument("--out", default=None, help="results JSON (default bench/results/<date>-<host>.json)")
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--budget-s", type=float, default=540.0, help="wall-clock budget of the whole run")
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--eval-archs", default=",".join(EVAL_ARCHS))
    p.add_argument("--eval-windows", type=int, default=64, help="windows per timed eval (x2 at 1.4B)")
    p.add_argument("--score-archs", default="pythia-1.4b,llama-3.1-8b")
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--score-batch", type=int, default=8)
    p.add_argument("--hutchinson-archs", default="pythia-1.4b,llama-3.1-8b")
    p.add_argument("--hutchinson-windows", type=int, default=4)
    p.add_argument("--select-arch", default="llama-3.1-8b")
    p.add_argument("--runbook-arch", default="llama-3.1-8b")
    p.add_argument("--runbook-windows", type=int, default=200)
    p.add_argument("--runbook-calib", type=int, default=128)
    p.add_argument("--runbook-metrics", default=",".join(RUNBOOK_METRICS))
    p.add_argument("--runbook-no-compile", dest="runbook_compile", action="store_false", default=None)
    p.add_argument("--runbook-score-dtype", default="fp32")
    p.add_argument("--multi-arch", default="mixtral-8x7b")
    p.add_argument("--multi-windows", type=int, default=32)
    p.add_argument("--multi-calib", type=int, default=16)
    p.add_argument(
        "--section-budgets",
        default="",
        help="per-section seconds, e.g. eval=200,score=90 (defaults in SECTION_S)",
    )
    p.add_argument("--progress", action="store_true", help="show progress bars")
    p.add_argument("--verbose", action="store_true")
    p.add_argument(
        "--report",
        nargs="*",
        default=None,
        metavar="JSON",
        help="print the markdown tables of existing results and exit",
    )
    return p


SECTION_S = {
    "env": 30,
    "eval": 240,
    "score": 120,
    "hutchinson": 90,
    "select": 60,
    "perturb": 45,
    "runbook": 590,
    "multi": 400,
}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.report is not None:
        for path in args.report:
            with open(path) as fh:
                print(markdown(json.load(fh)))
        return 0
    for name in ("eval_archs", "score_archs", "hutchinson_archs", "runbook_metrics"):
        setattr(args, name, [v for v in getattr(args, name).split(",") if v])
    args.section_s = dict(SECTION_S)
    for part in filter(None, args.section_budgets.split(",")):
        key, _, value = part.partition("=")
        args.section_s[key.strip()] = float(value)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.out is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = os.path.join("bench", "results", f"{stamp}-{platform.node() or 'host'}.json")
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        print(
            f"esa.bench.harness: unknown section(s) {sorted(unknown)}; choose from {SECTIONS}",
            file=sys.stderr,
        )
        return 2
    bench = Bench(args.out, args)
    bench.results["meta"]["sections"] = sections
    bench.results["meta"]["args"] = {k: v for k, v in vars(args).items() if k != "report"}
    if "env" not in sections:
        section_env_quiet(bench)
    runners = {
        "env": section_env,
        "eval": section_eval,
        "score": section_score,
        "hutchinson": section_hutchinson,
        "runbook": section_runbook,
        "multi": section_multi,
    }
    done_select = False
    for name in sections:
        if bench.left() < 5:
            bench.results["sections"].setdefault(name, {"rows": [], "errors": []})["errors"].append(
                "skipped: run budget spent"
            )
            continue
        if name in ("select", "perturb"):
            if not done_select:
                section_select_perturb(bench)
                done_select = True
            continue
        runners[name](bench)
    bench.save()
    print(markdown(bench.results))
    print(f"[bench] wrote {args.out} ({time.time() - bench.start:.0f} s)")
    return 0


def section_env_quiet(bench: Bench) -> None:
    import transformers

    bench.results["meta"]["env"] = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if torch.cuda.is_available()
        else [],
        "date": datetime.date.today().isoformat(),
    }


if __name__ == "__main__":
    sys.exit(main())
