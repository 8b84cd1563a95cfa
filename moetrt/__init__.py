"""moetrt: graph-compiled deployment of Mixtral-class sparse Mixture-of-Experts models."""

__version__ = "0.1.0"
