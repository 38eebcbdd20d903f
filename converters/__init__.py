"""Converters: PyTorch and TensorFlow/Keras models to ONNX, each export checked for fidelity."""
