"""afil-ray: Adaptive Failure-Informed Learning for VLA policies, distributed on Ray."""

__version__ = "0.1.0"
