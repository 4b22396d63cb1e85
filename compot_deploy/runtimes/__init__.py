"""Runtimes the exported and compressed models run on: ONNX Runtime sessions (ort.py)."""
