"""chat: real-time chats between customers and barbers, across instances.

Messages are stored in MongoDB with a per-chat ``seq`` and fanned out over Redis
pub/sub; users are looked up in authen through a cache sharded over the Redis Cluster.
"""
