"""Pure protocol code: no I/O, no httpx, no starlette."""
