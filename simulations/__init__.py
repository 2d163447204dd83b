"""Simulated federations on one machine: the launcher, faulty-client scenarios, centralised training."""
