"""Cost of mollification in a training step: the same step with and without the Mollifier.

Times forward, soft-label cross-entropy, backward and an SGD step at the paper's batch size.
"Without" runs a disabled Mollifier, which is exactly what plain training runs (one-hot labels
through the same code path). The two variants alternate in rounds so that load from other
processes hits both alike; the median of the paired per-round ratios is the overhead.

Second, the Mollifier alone against a masked reference written the straightforward way (roles
drawn on the host, a boolean mask per role, the DCT blur on the blurred rows only, noise on the
noised rows only), at each of --reference-sizes, paired rounds likewise. The reference's blur is
the method's formula as written, DCT -> decay -> inverse DCT; the Mollifier's is one per-sample
K x K kernel (mollify.heat_blur), so the ratio holds the blur's factorisation and the role path
together. A second reference with the Mollifier's own blur isolates the role path: host masks
against sync-free stratified rows.

    PYTHONPATH=. python jobs/bench/mollify.py --device cpu --steps 2 --rounds 9
Targets: mollified / plain <= 1.02 on CPU, <= 1.01 on GPU; masked reference / Mollifier >= 1.5
(CPU, batch 128, 32 and 64 px).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from common import device_name, report_result, synchronize
from raymoll.models import build_model
from raymoll.mollify import (Mollifier, MollifyConfig, blur_sigma, heat_blur, noise_coefficients,
                             sample_beta)

TARGETS = {"cpu": 1.02, "cuda": 1.01}
REFERENCE_TARGET = 1.5


def dct_heat_blur(x: torch.Tensor, tau: torch.Tensor, dct: torch.Tensor,
                  eigenvalues: torch.Tensor) -> torch.Tensor:
    """The heat blur as the method writes it: per channel, X = D x D^T, X * exp(-(l_i + l_j)
    tau), back by D^T X D. x (N, C, S, S) float, tau (N,) in pixels^2; dct (S, S) and
    eigenvalues (S,) the Mollifier's basis buffers (built once, as a real implementation would).

    Each product is a right-multiply over all rows (one GEMM), the left ones by transposing:
    twice as fast here as `D @ x @ D.T` with a broadcast D, so the reference is not a straw man.
    """
    decay = torch.exp(-(eigenvalues[:, None] + eigenvalues[None, :]) * tau[:, None, None, None])
    coefficients_t = (x @ dct.T).transpose(-1, -2) @ dct.T  # (D x D^T)^T; decay is symmetric
    return ((coefficients_t * decay) @ dct).transpose(-1, -2) @ dct


def masked_reference(m: Mollifier, x: torch.Tensor, y: torch.Tensor, same_blur: bool = False
                     ) -> tuple[torch.Tensor, ...]:
    """The straightforward mollifier: host-drawn roles, boolean masks, the DCT blur (or with
    same_blur the Mollifier's heat_blur) only on the blurred rows and noise only on the noised
    ones (each mask indexing syncs the host on a GPU)."""
    c, n = m.cfg, len(x)
    role = torch.multinomial(torch.tensor([c.p_clean, c.p_noise, c.p_blur, c.p_both]), n,
                             replacement=True).to(x.device)
    t = torch.where(role == 0, 0.0, sample_beta(c.t_alpha, c.t_beta, n, None, x.device))
    x_t = x.clone()
    blurred, noised = (role & 2) != 0, (role & 1) != 0
    tau = blur_sigma(t[blurred], c.sigma_min, m.sigma_max, c.blur_schedule) ** 2 / 2
    x_t[blurred] = (heat_blur(x[blurred], tau) if same_blur
                    else dct_heat_blur(x[blurred], tau, m.dct, m.eigenvalues))
    alpha, sigma = noise_coefficients(t[noised], c.noise_schedule, c.noise_shape)
    rows = x_t[noised]
    x_t[noised] = alpha[:, None, None, None] * rows + sigma[:, None, None, None] * torch.randn_like(rows)
    gamma_n = torch.where(noised, noise_coefficients(t, c.noise_schedule)[1] ** 2, 0.0)
    gamma_b = torch.where(blurred, t, 0.0)
    gamma = (1 - (1 - gamma_b) * (1 - gamma_n))[:, None]
    y_t = (1 - gamma) * (y[:, None] == torch.arange(m.num_classes, device=y.device)) + gamma / m.num_classes
    return x_t, y_t


REFERENCES = ("reference", "reference, same blur")


def reference_timings(size: int, batch: int, classes: int, rounds: int, device: torch.device
                      ) -> dict[str, list[float]]:
    """Seconds per batch in each of `rounds` alternating rounds, for the stratified Mollifier,
    the iid (branch-free) one and the masked references (DCT blur, the Mollifier's blur)."""
    m = Mollifier(MollifyConfig(), size, classes).to(device)
    iid = Mollifier(dataclasses.replace(MollifyConfig(), role_sampling="iid"), size,
                    classes).to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, classes, (batch,), device=device)
    variants = {"mollifier": lambda: m(x, y), "iid": lambda: iid(x, y),
                REFERENCES[0]: lambda: masked_reference(m, x, y),
                REFERENCES[1]: lambda: masked_reference(m, x, y, same_blur=True)}
    for fn in variants.values():
        time_steps(fn, 2, device)
    times = {v: [] for v in variants}
    for r in range(rounds):
        for v in (list(variants) if r % 2 == 0 else list(reversed(variants))):
            times[v].append(time_steps(variants[v], 5, device))
    return times


def time_steps(step: Callable[[], None], steps: int, device: torch.device) -> float:
    """Seconds per call of `step`, averaged over `steps` calls (queued GPU work included)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def make_train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    mollifier: Mollifier, x: torch.Tensor, y: torch.Tensor,
                    bf16: bool) -> Callable[[], None]:
    """One training step on a fixed batch; on CUDA the mollifier must not sync the host."""
    device = x.device
    no_sync = device.type == "cuda"

    def step() -> None:
        if no_sync:
            torch.cuda.set_sync_debug_mode("error")
        try:
            x_t, y_t = mollifier(x, y)
        finally:
            if no_sync:
                torch.cuda.set_sync_debug_mode("default")
        autocast = torch.autocast(device.type, torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            loss = F.cross_entropy(model(x_t), y_t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--size", type=int, default=32, help="image width = height (pixels)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--steps", type=int, default=2, help="steps per timing")
    parser.add_argument("--rounds", type=int, default=9, help="alternating timings of each")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cpu", "cuda"))
    parser.add_argument("--model", default="preactresnet18")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the mollifier (fullgraph), as optim.compile does")
    parser.add_argument("--reference-sizes", type=int, nargs="*", default=[32, 64],
                        help="image sizes of the Mollifier vs masked-reference comparison")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build_model(args.model, args.classes).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    bf16 = device.type == "cuda" and not args.fp32

    variants, mollifiers = {}, {}
    for name, enabled in (("plain", False), ("mollified", True)):
        cfg = dataclasses.replace(MollifyConfig(), enabled=enabled)
        mollifier = Mollifier(cfg, args.size, args.classes).to(device)
        if args.compile:
            mollifier = torch.compile(mollifier, fullgraph=True)
        mollifier(x, y)  # compiles, if asked, before the steps forbid host syncs
        variants[name] = make_train_step(model, optimizer, mollifier, x, y, bf16)
        mollifiers[name] = mollifier

    for step in variants.values():
        time_steps(step, args.warmup, device)
    times = {name: [] for name in variants}
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            times[name].append(time_steps(variants[name], args.steps, device))
    alone = time_steps(lambda: mollifiers["mollified"](x, y), 20, device)

    plain, mollified = (statistics.median(times[n]) for n in ("plain", "mollified"))
    # Adjacent timings share the machine's state: the median of the paired ratios cancels the
    # drift that the ratio of the two medians keeps.
    per_round = [m / p for p, m in zip(times["plain"], times["mollified"])]
    ratio = statistics.median(per_round)
    spread = (max(times["plain"]) - min(times["plain"])) / plain
    target = TARGETS[device.type]
    print(f"{args.model}, batch {args.batch}, {args.size} px, {device.type}, "
          f"{args.threads} threads, bf16={bf16}, compiled mollifier={args.compile}; "
          f"{args.rounds} rounds x {args.steps} steps")
    print(f"plain step:      {plain * 1e3:9.2f} ms (median)")
    print(f"mollified step:  {mollified * 1e3:9.2f} ms (median)")
    print(f"mollifier alone: {alone * 1e3:9.2f} ms per batch "
          f"({alone / plain:.2%} of a plain step: the overhead without timing noise)")
    print(f"ratio: {ratio:.4f}, median of paired rounds (target <= {target}); per round "
          f"{min(per_round):.3f}..{max(per_round):.3f}; plain-step spread {spread:.1%}")
    passed = ratio <= target
    print("meets target" if passed else "misses target")
    report_result("mollify", f"mollified / plain training step, {args.model} batch {args.batch}",
                  ratio, "x", f"<= {target}", passed, device_name(device),
                  f"median of {args.rounds} paired rounds x {args.steps} steps: plain "
                  f"{plain * 1e3:.1f} ms, mollified {mollified * 1e3:.1f} ms, mollifier alone "
                  f"{alone * 1e3:.2f} ms; bf16={bf16}, compiled mollifier={args.compile}")


    for size in args.reference_sizes:
        times = reference_timings(size, args.batch, args.classes, args.rounds, device)
        ms = {v: statistics.median(ts) * 1e3 for v, ts in times.items()}
        for reference in REFERENCES:
            per_round = [ref / mol for mol, ref in zip(times["mollifier"], times[reference])]
            speedup = statistics.median(per_round)
            # The target is set against the straightforward reference; the same-blur one
            # only tells what the role path alone is worth.
            targeted = reference == REFERENCES[0]
            print(f"{size} px: Mollifier {ms['mollifier']:.2f} ms (iid roles, every op on every "
                  f"row: {ms['iid']:.2f} ms), masked {reference} {ms[reference]:.2f} ms per "
                  f"batch: {speedup:.2f}x (rounds {min(per_round):.2f}..{max(per_round):.2f}"
                  + (f"; target >= {REFERENCE_TARGET})" if targeted else ")"))
            blur = "DCT blur" if targeted else "the Mollifier's K x K blur"
            report_result(f"mollify vs masked{'' if targeted else ', same blur,'} {size}px",
                          f"masked reference ({blur}) / stratified Mollifier, batch "
                          f"{args.batch}, {size} px", speedup, "x",
                          f">= {REFERENCE_TARGET}" if targeted else "none",
                          speedup >= REFERENCE_TARGET if targeted and device.type == "cpu"
                          else None, device_name(device),
                          f"median of {args.rounds} paired rounds x 5 batches: Mollifier "
                          f"{ms['mollifier']:.2f} ms (iid roles {ms['iid']:.2f} ms), reference "
                          f"{ms[reference]:.2f} ms; per round {min(per_round):.2f}.."
                          f"{max(per_round):.2f}x")


if __name__ == "__main__":
    main()
