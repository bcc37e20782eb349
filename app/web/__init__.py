"""The HTTP side: the JSON API blueprint (api), its OpenAPI document (openapi).

May import the store, the domain, ingest, settings and the cross-cutting modules of courier.app;
nothing below it imports the web layer (import contracts in pyproject.toml).
"""
