"""ONNX graphs of a bundle -> TensorRT engines, their manifest entries, and the checks that refuse foreign engines."""
