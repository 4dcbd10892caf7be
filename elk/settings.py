"""Settings of `python -m elk setup`, from environment variables (read once, fail fast)."""

from __future__ import annotations

import base64
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ElkSettings(BaseSettings):
    model_config = SettingsConfigDict(case_sensitive=False, extra="ignore", frozen=True)

    elasticsearch_url: str = "http://127.0.0.1:9200"
    # Either an API key ("id:key", or its base64 encoding as Kibana shows it) or a user
    # and password.
    elasticsearch_api_key: str = ""
    elasticsearch_username: str = ""
    elasticsearch_password: str = ""
    # A CA bundle for an https cluster with its own certificate authority.
    elasticsearch_ca_certs: str = ""
    # Empty: leave Kibana alone (only Elasticsearch is set up).
    kibana_url: str = "http://127.0.0.1:5601"
    kibana_space: str = ""
    elk_log_retention_days: int = Field(14, gt=0)
    elk_rollover_max_size: str = "10gb"
    elk_rollover_max_age: str = "1d"
    elk_replicas: int = Field(1, ge=0)
    # How long setup waits for Elasticsearch (and Kibana) to answer before giving up.
    elk_wait_s: float = Field(180.0, gt=0)

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the Elasticsearch client: authentication and TLS."""
        kwargs: dict[str, Any] = {}
        if self.elasticsearch_api_key:
            kwargs["api_key"] = self._api_key_pair() or self.elasticsearch_api_key
        elif self.elasticsearch_username:
            kwargs["basic_auth"] = (self.elasticsearch_username, self.elasticsearch_password)
        if self.elasticsearch_ca_certs:
            kwargs["ca_certs"] = self.elasticsearch_ca_certs
        return kwargs

    def kibana_headers(self) -> dict[str, str]:
        """Kibana takes the same credentials as Elasticsearch."""
        if self.elasticsearch_api_key:
            pair = self._api_key_pair()
            encoded = base64.b64encode(":".join(pair).encode()).decode() if pair else self.elasticsearch_api_key
            return {"Authorization": f"ApiKey {encoded}"}
        if self.elasticsearch_username:
            user_pass = f"{self.elasticsearch_username}:{self.elasticsearch_password}".encode()
            return {"Authorization": f"Basic {base64.b64encode(user_pass).decode()}"}
        return {}

    def _api_key_pair(self) -> tuple[str, str] | None:
        """("id", "key") when the key is given as Filebeat takes it ("id:key"), else None."""
        key_id, sep, key = self.elasticsearch_api_key.partition(":")
        return (key_id, key) if sep else None
