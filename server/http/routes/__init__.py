"""HTTP routers: inference (classify), operations (health), adapter lifecycle (adapters)."""
