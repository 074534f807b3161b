"""fedshield: private federated learning on Flower, with Opacus DP-SGD, secure aggregation and TLS."""

__version__ = "0.1.0"
