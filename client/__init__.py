"""Client side: the ClientApp, local training and per-node state."""
