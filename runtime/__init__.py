"""Runtime: batch inference and validation on onnxruntime."""
