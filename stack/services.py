"""The declarative list of service processes the stack runs, after the data tier is healthy.

One entry per service; each instance is ``python -m <module>`` with ``PORT`` set to one
of the ports of ``port_key`` in :data:`stack.layout.BASE_PORTS` (plus the offset).
Entries start in list order and stop in reverse order.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    module: str
    port_key: str
    # Extra environment for every instance (on top of stack.layout.service_env).
    env: dict[str, str] = field(default_factory=dict)
    # Commands `python -m <module> <args...>` run in order, each to completion, before the
    # instances start (e.g. ("migrate",) for Alembic migrations).
    setup: tuple[tuple[str, ...], ...] = ()
    # An HTTP GET that answers 200 once an instance is ready.
    health_path: str = "/utilities/status"
    # Whether it signs tokens (gets the private key's path); only authen does.
    signs_tokens: bool = False

    def instance_names(self, count: int) -> list[str]:
        return [self.name] if count == 1 else [f"{self.name}-{i + 1}" for i in range(count)]


def signs_tokens(module: str) -> bool:
    return any(spec.signs_tokens for spec in SERVICES if spec.module == module)


SERVICES: list[ServiceSpec] = [
    ServiceSpec("discovery", "discovery", "discovery", health_path="/status"),
    ServiceSpec(
        "authen",
        "authen",
        "authen",
        env={"ENABLE_SLEEPY": "1"},
        signs_tokens=True,
        setup=(("migrate",), ("create-admin", "--if-configured")),
    ),
    ServiceSpec("chat", "chat", "chat"),
    ServiceSpec("etl", "etl", "etl", setup=(("migrate",),)),
    # The local stack routes the test-only sleepy endpoint (as authen serves it).
    ServiceSpec("gateway", "gateway", "gateway", env={"ENABLE_SLEEPY": "1"}, health_path="/status"),
]
