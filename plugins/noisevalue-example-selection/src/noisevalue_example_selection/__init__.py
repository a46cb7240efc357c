"""An example noisevalue plugin: a rater and a stochastic selector, built only on the
public interfaces (``noisevalue.interfaces``, ``noisevalue.selectors.RaterSelector``)."""
