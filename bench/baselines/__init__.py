"""The targets the relay is compared with: the seed note's algorithm and a bare WebSocket endpoint."""
