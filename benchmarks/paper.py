"""The paper's F-PNDM sampling loop as its public code runs it (luping-liu/PNDM: runner/runner.py sample_image,
runner/method.py gen_order_4, runge_kutta and transfer), rewritten for the benchmarks as the baseline.

Kept on purpose, since they are what the fast paths remove: the time steps built as (n,) tensors on the host
every step and moved to the device; the image copied to the host after every step and back before the next
(the `imgs` list keeps every step's image); the eps history as a growing Python list; the alphas gathered per
sample (ac[t.long() + 1]) inside every transfer; every formula as separate elementwise torch ops.
"""

from __future__ import annotations

import torch


def transfer(x, t, t_next, e, ac):
    """The paper's eq. (9): x moved from t to t_next along eps e; t, t_next are (n,) tensors, ac the float32
    cumulative alphas, read one index late as the paper's code does."""
    at = ac[t.long() + 1].view(-1, 1, 1, 1)
    at_next = ac[t_next.long() + 1].view(-1, 1, 1, 1)
    x_coef = 1 / (at.sqrt() * (at.sqrt() + at_next.sqrt()))
    e_coef = 1 / (at.sqrt() * (((1 - at_next) * at).sqrt() + ((1 - at) * at_next).sqrt()))
    return x + (at_next - at) * (x_coef * x - e_coef * e)


def multistep_eps(ets: list):
    """The paper's eq. (12), the 4th-order pseudo linear multistep eps; ets[-1] is the newest."""
    return (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])


def f_pndm_step(img, t, t_next, model, ac, ets: list):
    """One F-PNDM step: pseudo Runge-Kutta (4 model calls) until 3 eps are known, then multistep (1 call)."""
    if len(ets) > 2:
        ets.append(model(img, t))
        e = multistep_eps(ets)
    else:
        t_mid = (t + t_next) / 2
        e1 = model(img, t)
        ets.append(e1)
        e2 = model(transfer(img, t, t_mid, e1, ac), t_mid)
        e3 = model(transfer(img, t, t_mid, e2, ac), t_mid)
        e4 = model(transfer(img, t, t_next, e3, ac), t_next)
        e = (1 / 6) * (e1 + 2 * e2 + 2 * e3 + e4)
    return transfer(img, t, t_next, e, ac)


def sample(model, noise: torch.Tensor, ac: torch.Tensor, sample_step: int, total_step: int = 1000) -> torch.Tensor:
    """F-PNDM from `noise` (n, C, H, W) in `sample_step` steps; model(x, t) takes t as a float (n,) tensor.
    Returns the final image on the host, as the paper's loop does."""
    skip = total_step // sample_step
    seq = range(0, total_step, skip)
    seq_next = [-1] + list(seq[:-1])
    n, device = noise.shape[0], noise.device
    imgs, ets = [noise], []
    with torch.no_grad():
        for i, j in zip(reversed(seq), reversed(seq_next)):
            t = (torch.ones(n) * i).to(device)
            t_next = (torch.ones(n) * j).to(device)
            img_next = f_pndm_step(imgs[-1].to(device), t, t_next, model, ac, ets)
            imgs.append(img_next.to("cpu"))
    return imgs[-1]
