"""What a message means, with no I/O: canonical models (canonical), per-destination bodies (transforms)
and data minimisation by clearance (governance).

Imports nothing of the store, the web layer, ingest or the CLI (import contracts in pyproject.toml);
transforms reads HL7 through courier.app.hl7.to_canonical, which is pure as well.
"""
