"""ONNX export of compressed models: the `ai.compot` op domain (ops.py), tracing (torch_ops.py, onnx_export.py)
and the parity gate (validate.py)."""
