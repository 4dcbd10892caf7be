"""The API gateway: routing, balancing, limits, breakers, timeouts and WebSockets."""
