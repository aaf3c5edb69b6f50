"""brightpaint: HTS microscopy from brightfield z-stacks to biology."""

__version__ = "0.1.0"
