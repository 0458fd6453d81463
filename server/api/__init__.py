"""The HTTP API: routers only (use cases live in server.services)."""
