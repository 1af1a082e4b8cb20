"""Codecs: CPU reference codecs and nvCOMP bindings (installed as ``offload_runtime.native``)."""
