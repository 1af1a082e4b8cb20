"""Checkpoints in, compressed container out and back (installed as ``offload_runtime.loaders``)."""
