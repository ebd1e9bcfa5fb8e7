"""Redis adapter: key schema, Lua scripts, stores for records, accesses, audit and the outbox, embedded server."""
