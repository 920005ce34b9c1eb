"""mnist-pipeline: train → export → serve → measure, on a laptop or on Kubernetes."""

__version__ = "0.2.0"
