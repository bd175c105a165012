"""Rectified-flow (flow-matching) training target and Euler sampler, as Wan is trained.

Convention (Wan / SD3): ``x_t = (1 - sigma) * x0 + sigma * noise`` with ``sigma`` in [0, 1] (1 = pure
noise), the model predicts the velocity ``v = noise - x0``, and its ``timestep`` input is ``1000 * sigma``.
A ``shift`` > 1 moves sigmas towards the noisy end: ``shift * s / (1 + (shift - 1) * s)`` (Wan's
``FlowMatchEulerDiscreteScheduler`` uses the same formula).
"""

from __future__ import annotations

import hashlib

import torch

TIMESTEP_SCALE = 1000.0


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    if shift == 1.0:
        return sigma
    return shift * sigma / (1 + (shift - 1) * sigma)


def sample_sigmas(u: torch.Tensor, mode: str = "logit_normal", shift: float = 1.0) -> torch.Tensor:
    """Map ``u`` (uniform in (0,1) for ``"uniform"``, standard normal for ``"logit_normal"``) to sigmas."""
    if mode == "uniform":
        s = u
    elif mode == "logit_normal":
        s = torch.sigmoid(u)
    else:
        raise ValueError(f"timestep sampling mode must be 'uniform' or 'logit_normal', got {mode!r}")
    return shift_sigma(s, shift)


def per_sample_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys (e.g. seed, step, global sample index).

    Drawing noise and timesteps per *sample* from its own keys makes training independent of how samples
    are split over processes and of where a run was stopped and resumed.
    """
    digest = hashlib.blake2b(",".join(str(int(k)) for k in keys).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def draw_noise_and_sigma(shape: tuple[int, ...], keys: tuple[int, ...], mode: str = "logit_normal",
                         shift: float = 1.0, sigma: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic ``(noise (shape), sigma ())`` for one sample; ``sigma`` fixes the level if given."""
    g = per_sample_generator(*keys)
    noise = torch.randn(shape, generator=g, dtype=torch.float32)
    if sigma is None:
        u = torch.rand((), generator=g) if mode == "uniform" else torch.randn((), generator=g)
        s = sample_sigmas(u, mode, shift).clamp(1e-4, 1.0)
    else:
        s = torch.tensor(float(sigma))
    return noise, s


def noisy_input_and_target(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor):
    """``x_t`` and the velocity target for a batch; ``sigma`` is ``(B,)``."""
    s = sigma.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise, noise - x0


def predict(model, x_t: torch.Tensor, sigma: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Velocity prediction of a diffusers Wan-style transformer."""
    return model(hidden_states=x_t, timestep=sigma * TIMESTEP_SCALE, encoder_hidden_states=text_embeds,
                 return_dict=False)[0]


def flow_matching_loss(model, x0, noise, sigma, text_embeds, reduction: str = "mean") -> torch.Tensor:
    """MSE between the predicted and the true velocity (per sample if ``reduction="none"``)."""
    x_t, target = noisy_input_and_target(x0, noise, sigma)
    pred = predict(model, x_t, sigma, text_embeds)
    err = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
    return err.mean() if reduction == "mean" else err


@torch.no_grad()
def euler_sample(model, noise: torch.Tensor, text_embeds: torch.Tensor, steps: int = 25, shift: float = 1.0,
                 progress: bool = False) -> torch.Tensor:
    """Generate with the Euler ODE sampler from ``noise`` (sigma 1 -> 0). Returns ``x0`` in model space."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sigmas = shift_sigma(torch.linspace(1.0, 0.0, steps + 1), shift)
    x = noise
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="sampling", leave=False)
    for i in it:
        s = torch.full((x.shape[0],), float(sigmas[i]), device=x.device)
        v = predict(model, x, s, text_embeds).to(x.dtype)
        x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * v
    return x
