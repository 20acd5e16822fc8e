"""layerzip: decompose the layers of trained neural networks."""
__version__ = "0.1.0"
