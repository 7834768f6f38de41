"""dmf: generalizable person re-identification with deep multimodal fusion."""

__version__ = "0.1.0"
