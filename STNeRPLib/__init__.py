"""STNeRP engine: ST-NeRP networks, training, warping, metrics, I/O and the worker command."""

__version__ = "0.1.0"
