"""One module per CLI command; each has ``register(app)``. Heavy imports happen inside the command functions."""
