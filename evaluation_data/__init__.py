"""Held-out evaluation data shipped with the toolchain (README.md here); found through importlib.resources."""
