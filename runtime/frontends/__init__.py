"""The front-ends: the CLI, the workstation app and Triton serving, all on runtime.core."""
