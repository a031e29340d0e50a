"""Quantized bundles: the calibration set (data.py), weight-only int4/int8 (quantize.py), w8a8/fp8 Q/DQ (qdq.py),
the driver (calibrate.py) and the accuracy report (report.py)."""
