"""Container deployment helpers (compose.yml, Dockerfile): entrypoints, bootstrap jobs, checks."""
