"""mnist-pipeline: train → export → serve → measure, on a laptop or on Kubernetes."""

__version__ = "0.1.0"
