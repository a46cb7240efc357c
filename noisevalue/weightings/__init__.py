"""Loss weightings: a weight per training sample from its timestep's SNR, multiplying the
epsilon loss (``train.loss_weighting``).

* ``uniform``: 1 everywhere, the plain epsilon objective (the default);
* ``min_snr``: Min-SNR-gamma (Hang et al. 2023), ``min(SNR, gamma) / SNR`` for
  epsilon prediction;
* ``p2``: perception-prioritised weighting (Choi et al. 2022), ``1 / (k + SNR)^gamma``.
"""

from noisevalue.weightings.builtin import P2, MinSNR, Uniform

__all__ = ["MinSNR", "P2", "Uniform"]
