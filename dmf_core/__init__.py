"""dmf: generalizable person re-identification with deep multimodal fusion.

``from dmf_core import FeatureExtractor`` gives a trained model as a function images -> features
(:mod:`dmf_core.extractor`); it is imported on first use, so ``import dmf_core`` stays light
(the ``dmf`` command and the data stages do not pay for torch until they need it).
"""

__version__ = "0.1.0"
__all__ = ["FeatureExtractor", "__version__"]


def __getattr__(name: str):
    if name == "FeatureExtractor":
        from dmf_core.extractor import FeatureExtractor

        return FeatureExtractor
    raise AttributeError(f"module 'dmf_core' has no attribute {name!r}")
