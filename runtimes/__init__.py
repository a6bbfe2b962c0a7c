"""Runners: one per backend (torch, onnxruntime, openvino, tensorrt), behind one surface."""
