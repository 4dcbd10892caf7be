"""Service discovery: a registry of live instances in Redis, with TTLs and long-poll watches."""
