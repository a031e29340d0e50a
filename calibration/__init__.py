"""Calibration for quantized engines: not built yet (no open issue covers it); see README "Status"."""
