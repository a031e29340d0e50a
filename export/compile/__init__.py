"""The compiler proper: reference modules -> per-task ONNX graphs, one weights file, the manifest (a bundle)."""
