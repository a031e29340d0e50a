"""The bundle contract: the typed manifest and reports, graph specs, HealthGPT's facts, file digests, errors.
Imports nothing of the project above it."""
