"""Tokens issued by authen: verified by common.tokens.TokenVerifier, and tampering refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.tokens import InvalidToken, TokenSigner, TokenVerifier
from tests.http import call
from tests.stackproc import StackProcess
from tests.test_authen_support import signup


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


@pytest.fixture(scope="module")
def verifier(stack: StackProcess) -> TokenVerifier:
    return TokenVerifier.from_file(Path(stack.env["JWT_PUBLIC_KEY_FILE"]))


@pytest.fixture
async def issued(stack: StackProcess) -> tuple[str, int]:
    body, created = await signup(stack.url("authen", 0), type_="customer")
    assert created.code == 201
    reply = await call(
        "POST", stack.url("authen", 1) + "/authen/signin", {"username": body["username"], "password": body["password"]}
    )
    assert reply.code == 200, reply
    return reply.json["token"], reply.json["user_id"]


def _other_key_pem() -> bytes:
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


async def test_issued_token_carries_the_claims(issued: tuple[str, int], verifier: TokenVerifier) -> None:
    token, user_id = issued
    claims = verifier.verify(token)
    assert claims.user_id == user_id and claims.user_type == "customer"
    payload = json.loads(_unb64(token.split(".")[1]))
    assert set(payload) == {"sub", "typ", "iat", "exp", "jti"}
    assert json.loads(_unb64(token.split(".")[0]))["alg"] == "EdDSA"


@pytest.mark.parametrize("change", [{"sub": "1"}, {"typ": "admin"}, {"exp": 4102444800}])
async def test_changed_payload_is_rejected(issued: tuple[str, int], verifier: TokenVerifier, change: dict) -> None:
    token, _ = issued
    header, payload, signature = token.split(".")
    claims = {**json.loads(_unb64(payload)), **change}
    forged = ".".join([header, _b64(json.dumps(claims).encode()), signature])
    with pytest.raises(InvalidToken):
        verifier.verify(forged)


async def test_token_signed_by_another_key_is_rejected(issued: tuple[str, int], verifier: TokenVerifier) -> None:
    _, user_id = issued
    forged = TokenSigner(_other_key_pem(), 3600).issue(user_id, "admin")
    with pytest.raises(InvalidToken):
        verifier.verify(forged)


async def test_unsigned_and_hmac_tokens_are_rejected(
    issued: tuple[str, int], verifier: TokenVerifier, stack: StackProcess
) -> None:
    token, _user_id = issued
    claims = json.loads(_unb64(token.split(".")[1]))
    unsigned = ".".join([_b64(b'{"alg":"none","typ":"JWT"}'), _b64(json.dumps(claims).encode()), ""])
    with pytest.raises(InvalidToken):
        verifier.verify(unsigned)
    # Algorithm confusion: the public key used as an HMAC secret.
    public_pem = Path(stack.env["JWT_PUBLIC_KEY_FILE"]).read_bytes()
    header = _b64(b'{"alg":"HS256","typ":"JWT"}')
    body = header + "." + _b64(json.dumps(claims).encode())
    mac = hmac.new(public_pem, body.encode(), hashlib.sha256).digest()
    with pytest.raises(InvalidToken):
        verifier.verify(body + "." + _b64(mac))


def test_expired_token_is_rejected(stack: StackProcess, verifier: TokenVerifier) -> None:
    signer = TokenSigner.from_file(stack.layout.jwt_private_key, 3600)
    expired = signer.issue(1, "customer", ttl_s=-10)
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify(expired)
    fresh = signer.issue(1, "customer")
    assert verifier.verify(fresh).expires_at > time.time()


@pytest.mark.parametrize("missing", ["sub", "typ", "iat", "exp", "jti"])
def test_token_missing_a_claim_is_rejected(stack: StackProcess, verifier: TokenVerifier, missing: str) -> None:
    key = serialization.load_pem_private_key(stack.layout.jwt_private_key.read_bytes(), password=None)
    now = int(time.time())
    claims = {"sub": "1", "typ": "customer", "iat": now, "exp": now + 60, "jti": "x"}
    del claims[missing]
    with pytest.raises(InvalidToken):
        verifier.verify(jwt.encode(claims, key, algorithm="EdDSA"))
