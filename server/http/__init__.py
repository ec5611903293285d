"""The front end: what an HTTP worker process runs (routes, schemas, tokenization, post-processing)."""
