"""featurestore: the ovss feature store, image sources, backbones and the extraction pipeline."""

__version__ = "0.1.0"
