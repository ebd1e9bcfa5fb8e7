"""Pure domain: NHS numbers, records, accesses, visibility, codes and errors (standard library only)."""
