r"""Helpers that know nothing of pruning: atomic files and checksums, the main-process test, Hub uploads.

May import: the standard library, torch, huggingface_hub, accelerate. Nothing else in hfprune.
"""
