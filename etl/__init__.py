"""etl: extracts users (authen) and chats/messages (chat), transforms them with pandas and
loads per-barber analytics into the ``warehouse`` database; serves the analytics API."""
