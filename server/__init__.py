"""The loraplex runtime: engine, batching, HTTP."""
