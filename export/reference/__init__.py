"""The PyTorch reference and release-file loading: what HealthGPT computes, read from the release files."""
