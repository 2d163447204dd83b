"""Server side: the ServerApp, its round loop, versions, checkpoints, metrics and plots."""
