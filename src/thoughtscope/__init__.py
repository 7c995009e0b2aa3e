"""thoughtscope: read, map and steer what an open language model is thinking."""

__version__ = "0.1.0"
