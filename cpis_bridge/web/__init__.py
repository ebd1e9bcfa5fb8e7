"""aiohttp handlers and middlewares per API surface: fhir, cds, la (local authorities), ops."""
