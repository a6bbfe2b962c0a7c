"""Export: trace the reference model to ONNX (portable and ORT flavours) and package artifacts."""
