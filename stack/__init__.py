"""The local launcher: data servers and services as supervised processes (``make up``)."""
