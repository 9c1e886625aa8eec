"""Exports of checkpoints to the formats other runtimes load (GGUF for llama.cpp)."""
