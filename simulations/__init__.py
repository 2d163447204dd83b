"""Simulated federations on one machine: the launcher, scenarios and benchmark harness."""
