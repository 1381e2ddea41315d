"""Transports frame and write the hub's events; they never parse upstream data."""
