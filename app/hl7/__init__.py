"""HL7 v2: ER7 text in and out (er7), HL7 -> canonical events (to_canonical), the MLLP listener (listener).

er7 and to_canonical are pure: they import python-hl7 and the domain, never the store. The listener is a
front door like the web layer and may import ingest and the store.
"""
