"""Benchmark 3 (issues 6, 15): HVPs and seconds to the top Hessian eigenvalue within 1e-3 true error.

Our path (``top_hessian_eigenvalue``: scipy ``eigsh``, ARPACK's implicitly restarted Lanczos, on
the HVP ``LinearOperator``; residual stop at tol = 1e-3, residual recomputed from the recorded
products) against PyHessian 0.1's power iteration run at the loosest tolerance (a decade grid
1e-3 .. 1e-9) at which *every* seed reaches 1e-3 true relative error -- PyHessian's ``tol``
bounds the step-to-step change, not the error (``../shared/PROBES.md``). "At equal true
error" (issue 15): both at their loosest tolerance reaching 1e-3 on every seed (the last
column and the headline's second ratio).

Quadratic family: ``l(x) = 1/2 x^T H x``, ``H = Q diag(lambda) Q^T`` with Haar ``Q``,
d = 1000, float64, HVPs by double backward like any model. Spectra:

    1/i              lambda_i = 1/i
    gap 0.9          lambda_1 = 1, lambda_2 = 0.9, the rest uniform in [0, 0.9]
    gap 0.99         lambda_1 = 1, lambda_2 = 0.99, the rest uniform in [0, 0.99]
    outliers+MP      10, 7, 5, 4, 3 plus a Marchenko-Pastur bulk (ratio 0.5, eigenvalues of X^T X / 2000)
    indefinite       lambda_1 = 1, lambda_d = -0.9, the rest uniform in [-0.9, 0.9]

Our eigsh runs at ``tol = 1e-3`` on its residual bound, which *guarantees* the 1e-3
(the true error is then ~1e-6); the last column shows the loosest eigsh ``tol`` that also
reaches 1e-3 on every seed (the equal-true-error comparison). Timing: ``Lanczos ms`` recomputes the
forward per HVP (the probe default, least memory); ``graph kept`` reuses one gradient graph like
PyHessian. Medians over seeds (20; ``--quick``: 5). (Columns named "Lanczos" are our eigsh path.) Then MiniLM's LoRA parameters (task ``nlu-minilm``,
one batch, at its PEFT initialisation) when the task registry has it, with the reference
eigenvalue from Lanczos at tol 1e-10 (skipped in ``--quick`` unless ``--minilm``).

Run: ``python benchmarks/hessian_probe.py [--quick] [--minilm]``. The last line is the
headline ratio (PyHessian HVPs / Lanczos HVPs, median over the gapped spectra).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import warnings

import numpy as np
import torch
from torch import nn

from reflora_analysis.probes import top_hessian_eigenvalue
from reflora_analysis.probes.sharpness import _ClosureAsModel, _pyhessian_hvp_counter

PYHESSIAN_TOLS = [1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9]
LANCZOS_LOOSE_TOLS = [1e-1, 3e-2, 1e-2, 3e-3, 1e-3]
TARGET = 1e-3


def spectrum(name: str, d: int, gen: torch.Generator) -> torch.Tensor:
    u = lambda k, lo, hi: lo + (hi - lo) * torch.rand(k, generator=gen, dtype=torch.float64)  # noqa: E731
    if name == "1/i":
        return 1.0 / torch.arange(1, d + 1, dtype=torch.float64)
    if name == "gap 0.9":
        return torch.cat([torch.tensor([1.0, 0.9], dtype=torch.float64), u(d - 2, 0.0, 0.9)])
    if name == "gap 0.99":
        return torch.cat([torch.tensor([1.0, 0.99], dtype=torch.float64), u(d - 2, 0.0, 0.99)])
    if name == "outliers+MP":
        X = torch.randn(2 * d, d - 5, generator=gen, dtype=torch.float64)
        bulk = torch.linalg.eigvalsh(X.T @ X / (2 * d))
        return torch.cat([torch.tensor([10.0, 7.0, 5.0, 4.0, 3.0], dtype=torch.float64), bulk])
    if name == "indefinite":
        return torch.cat([torch.tensor([1.0, -0.9], dtype=torch.float64), u(d - 2, -0.9, 0.9)])
    raise ValueError(name)


SPECTRA = ["1/i", "gap 0.9", "gap 0.99", "outliers+MP", "indefinite"]


def quadratic(name: str, d: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    lam = spectrum(name, d, gen)
    Q, R = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R))
    H = (Q * lam) @ Q.T
    H = 0.5 * (H + H.T)
    model = nn.Module()
    model.x = nn.Parameter(torch.randn(d, generator=gen, dtype=torch.float64))
    return model, (lambda: 0.5 * model.x @ (H @ model.x)), float(lam.max())


def pyhessian_power(model, closure, tol, seed, max_iter=1000):
    """PyHessian 0.1 ``eigenvalues()`` as shipped, through our dict/CPU adapter; (value, hvps, s)."""
    from pyhessian import hessian as PyHessian
    counter = [0]
    dtype = next(p for p in model.parameters() if p.requires_grad).dtype
    old = torch.get_default_dtype()
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]), _pyhessian_hvp_counter(counter), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)  # PyHessian draws start vectors with the default dtype
        try:
            ph = PyHessian(_ClosureAsModel(model, closure), criterion=lambda out, _y: out,
                           data=(torch.zeros(1), torch.zeros(1)), cuda=False)
            vals, _ = ph.eigenvalues(maxIter=max_iter, tol=tol, top_n=1)
        finally:
            torch.set_default_dtype(old)
    for p in model.parameters():
        p.grad = None
    return float(vals[0]), counter[0], time.perf_counter() - start


def lanczos(model, closure, seed, tol=TARGET, recompute_forward=True):
    value, info = top_hessian_eigenvalue(model, closure, tol=tol, seed=seed, return_info=True,
                                         recompute_forward=recompute_forward)
    return value, info["hvps"], info["seconds"]


def compare(problems, log):
    """problems: list of (model, closure, exact). Returns a dict of medians."""
    lz = [lanczos(m, c, seed) + (e,) for seed, (m, c, e) in enumerate(problems)]
    lz_err = [abs(v - e) / abs(e) for v, _, _, e in lz]
    lz_kept = [lanczos(m, c, seed, recompute_forward=False)[2] for seed, (m, c, e) in enumerate(problems)]
    loose = (float("nan"), float("nan"))
    for tol in LANCZOS_LOOSE_TOLS:  # for information: Lanczos at its loosest sufficient tol too
        runs = [lanczos(m, c, seed, tol=tol) + (e,) for seed, (m, c, e) in enumerate(problems)]
        if max(abs(v - e) / abs(e) for v, _, _, e in runs) <= TARGET:
            loose = (tol, float(np.median([r[1] for r in runs])))
            break
    ph_default = None
    chosen = None
    for tol in PYHESSIAN_TOLS:
        runs = [pyhessian_power(m, c, tol, seed) + (e,) for seed, (m, c, e) in enumerate(problems)]
        errs = [abs(v - e) / abs(e) for v, _, _, e in runs]
        if ph_default is None:
            ph_default = (float(np.median([r[1] for r in runs])), float(np.median(errs)),
                          int(sum(err > TARGET for err in errs)))
        log(f"    pyhessian tol={tol:.0e}: median hvps {np.median([r[1] for r in runs]):.0f}, "
            f"max error {max(errs):.1e}")
        if max(errs) <= TARGET:
            chosen = (tol, runs, errs)
            break
    out = {"lanczos_hvps": float(np.median([r[1] for r in lz])),
           "lanczos_s": float(np.median([r[2] for r in lz])),
           "lanczos_kept_s": float(np.median(lz_kept)),
           "lanczos_loose_tol": loose[0], "lanczos_loose_hvps": loose[1],
           "lanczos_err_med": float(np.median(lz_err)), "lanczos_err_max": float(max(lz_err)),
           "ph_default_hvps": ph_default[0], "ph_default_err": ph_default[1],
           "ph_default_fail": ph_default[2]}
    if chosen is None:
        out.update(ph_tol=float("nan"), ph_hvps=float("nan"), ph_s=float("nan"), ph_err_max=float("nan"))
    else:
        tol, runs, errs = chosen
        out.update(ph_tol=tol, ph_hvps=float(np.median([r[1] for r in runs])),
                   ph_s=float(np.median([r[2] for r in runs])), ph_err_max=float(max(errs)))
    return out


def row(name, n, r):
    ratio = r["ph_hvps"] / r["lanczos_hvps"]
    return (f"| {name} | {n} | {r['ph_default_hvps']:.0f} ({r['ph_default_err']:.1e}; "
            f"{r['ph_default_fail']}/{n} > 1e-3) | {r['ph_tol']:.0e} | {r['ph_hvps']:.0f} | "
            f"{r['ph_s'] * 1e3:.1f} | {r['lanczos_hvps']:.0f} | {r['lanczos_s'] * 1e3:.1f} | "
            f"{r['lanczos_kept_s'] * 1e3:.1f} | "
            f"{r['lanczos_err_med']:.0e} / {r['lanczos_err_max']:.0e} | {ratio:.1f}x | "
            f"{r['lanczos_loose_tol']:.0e}: {r['lanczos_loose_hvps']:.0f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="5 seeds, no MiniLM (< 2 min on CPU)")
    ap.add_argument("--seeds", type=int, default=None)
    ap.add_argument("--dim", type=int, default=1000)
    ap.add_argument("--minilm", action="store_true", help="include MiniLM even with --quick")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    seeds = args.seeds or (5 if args.quick else 20)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    print(f"# hessian_probe: d={args.dim}, float64, {seeds} seeds, medians; target {TARGET:.0e} "
          f"true relative error; torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread")
    print("| problem | seeds | PyHessian default tol=1e-3: HVPs (median error; failures) | "
          "PyHessian loosest tol reaching 1e-3 | its HVPs | its ms | Lanczos HVPs | Lanczos ms | "
          "Lanczos ms, graph kept | Lanczos error median / max | HVP ratio | "
          "Lanczos loosest tol reaching 1e-3: HVPs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    gapped, tuned = [], []
    for name in SPECTRA:
        log(f"  spectrum {name}")
        problems = [quadratic(name, args.dim, s) for s in range(seeds)]
        r = compare(problems, log)
        print(row(name, seeds, r), flush=True)
        if name in ("gap 0.9", "gap 0.99"):
            gapped.append(r["ph_hvps"] / r["lanczos_hvps"])
            tuned.append(r["ph_hvps"] / r["lanczos_loose_hvps"])
    if args.quick and not args.minilm:
        print("| MiniLM LoRA | - | skipped in --quick (run without --quick or with --minilm) |")
    else:
        try:
            from reflora_analysis.tasks import available_tasks, make_task
            have = "nlu-minilm" in available_tasks()
        except ImportError:
            have = False
        if not have:
            print("| MiniLM LoRA | - | skipped: the task registry has no 'nlu-minilm' |")
        else:
            log("  MiniLM")
            task = make_task("nlu-minilm", quick=True)
            batch = task.batch(0)
            closure = lambda: task.loss(batch)  # noqa: E731
            ref, info = top_hessian_eigenvalue(task.model, closure, tol=1e-10, return_info=True, seed=99)
            log(f"    reference {ref:.10g} ({info['hvps']} HVPs, residual {info['residual']:.1e})")
            n = 1 if args.quick else 3
            r = compare([(task.model, closure, ref)] * n, log)
            print(row("MiniLM LoRA (nlu-minilm quick batch, PEFT init)", n, r))
    print(f"headline: PyHessian (at its loosest sufficient tol) needs {float(np.median(gapped)):.1f}x "
          f"the HVPs of our eigsh at its guaranteed tol=1e-3 ({gapped[0]:.1f}x on gap 0.9, "
          f"{gapped[1]:.1f}x on gap 0.99); at equal true error (both at their loosest tol "
          f"reaching 1e-3 on every seed) {tuned[0]:.1f}x on gap 0.9, {tuned[1]:.1f}x on gap 0.99 "
          f"(issue 15 target: >= 3x on gap 0.9)")


if __name__ == "__main__":
    main()
