"""The coordinator's configuration (environment variables; defaults join the local stack)."""

from __future__ import annotations

from pydantic import Field, model_validator

from common.config import ServiceSettings

CRASH_POINTS = (
    "after_log_start",
    "after_authen_prepared",
    "after_chat_prepared",
    "after_decision",
    "after_authen_committed",
    "saga_mid",
)


class CoordinatorSettings(ServiceSettings):
    coordinator_database_url: str = "postgresql+psycopg://barber@127.0.0.1:15432/coordinator"
    # How long one participant call may take before it counts as unreachable.
    coordinator_participant_timeout_s: float = Field(5.0, gt=0)
    # How long a DELETE waits for every participant to acknowledge the decision before
    # answering (recovery finishes the rest).
    coordinator_finish_wait_s: float = Field(15.0, gt=0)
    # How often recovery scans the log and the participants.
    coordinator_recovery_interval_s: float = Field(5.0, gt=0)
    # A transaction whose owner has not touched it for this long is taken over.
    coordinator_lease_s: float = Field(20.0, gt=0)
    coordinator_saga_batch: int = Field(2000, ge=1, le=100_000)
    # Test-only: exit the process at this point (needs BARBER_TEST_HOOKS=1).
    coordinator_crash_at: str = ""

    @model_validator(mode="after")
    def _crash_needs_test_hooks(self) -> CoordinatorSettings:
        if self.coordinator_crash_at:
            if self.coordinator_crash_at not in CRASH_POINTS:
                raise ValueError(f"COORDINATOR_CRASH_AT must be one of {', '.join(CRASH_POINTS)}")
            if not self.barber_test_hooks:
                raise ValueError("COORDINATOR_CRASH_AT is a test hook and needs BARBER_TEST_HOOKS=1")
        return self
