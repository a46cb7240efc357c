"""The learned timestep density over training, from a run's checkpoint."""

from __future__ import annotations

from pathlib import Path

from noisevalue import checkpoint as ckpt

GROUP = "timestep_sampler"


def plot_density(run: str | Path, out: str | Path | None = None) -> Path:
    """Plot the training density over log-SNR at every refresh (one line per refresh,
    lighter is earlier) from the newest checkpoint of ``run``; returns the PNG's path
    (default ``<run>/infonoise_density.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    path = ckpt.resolve_checkpoint(run)
    state = ckpt.load_tensors(path, GROUP)
    history, steps = state["history"], state["history_steps"]
    meta = ckpt.read_meta(path)
    from noisevalue.diffusion import Diffusion

    d = meta.diffusion or {}
    diffusion = Diffusion(d.get("num_timesteps", 1000), d.get("beta_schedule", "linear"),
                          d.get("beta_start", 1e-4), d.get("beta_end", 0.02))
    abar = diffusion.alphas_cumprod
    lam = torch.log(abar / (1 - abar))
    edges = torch.linspace(float(lam.min()), float(lam.max()), history.shape[1] + 1, dtype=torch.float64)
    centers = ((edges[:-1] + edges[1:]) / 2).numpy()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    uniform = torch.zeros(history.shape[1], dtype=torch.float64).index_add_(
        0, torch.bucketize(lam, edges[1:-1]), torch.full_like(lam, 1 / len(lam))) / (edges[1:] - edges[:-1])
    ax.plot(centers, uniform.numpy(), "k--", lw=1, label="uniform timesteps")
    for i, (row, step) in enumerate(zip(history, steps, strict=True)):
        shade = 0.25 + 0.75 * (i + 1) / len(history)
        ax.plot(centers, row.numpy(), color=(0.1, 0.3, 0.8, shade), lw=1.2,
                label=f"step {int(step)}" if i in (0, len(history) - 1) else None)
    ax.set_xlabel("log-SNR")
    ax.set_ylabel("training density")
    ax.set_title("InfoNoise: timestep density over training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out) if out else Path(run) / "infonoise_density.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
