"""Serving a bundle behind NVIDIA Triton Inference Server (python backend): the model repository, the model, the
server's environment and process, and a streaming client. See README.md, "Serving"."""
