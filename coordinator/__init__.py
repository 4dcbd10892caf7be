"""The deletion coordinator: atomic user deletion across authen and chat, by 2PC or saga.

It runs inside the gateway, which mounts it (:mod:`coordinator.app`) through a narrow
:class:`coordinator.app.Host`; it never imports the gateway. Its log lives in the
PostgreSQL database ``coordinator``; every state change is written before the message
that depends on it, so a crash at any point is finished by recovery
(``Coordinator.recover_once`` in :mod:`coordinator.deletion`).
"""
