r"""The hfprune version: one definition, read by the package root, the config stamp and the build."""

__version__ = "0.2.0.dev0"
