"""authen: accounts and tokens on a PostgreSQL primary with read replicas."""
