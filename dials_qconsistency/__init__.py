"""dials-qconsistency: is a processed DIALS model self-consistent in reciprocal space?"""

__version__ = "0.1.0"
