"""The small library every Barber service shares: config, errors, handlers, tokens, logs, bootstrap."""
