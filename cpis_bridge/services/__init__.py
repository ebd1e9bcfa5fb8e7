"""Use-cases: upload and correct records, record accesses, deliver notifications, sync flags (import only core)."""
