"""Masks sealed at rest under the provider's local data key (issue 10, item 9), and the
configuration that carries the key."""

from __future__ import annotations

import pytest

from server.config import Config, ConfigError
from server.domain.sealing import Sealer, at_rest_form
from storage.postgres.qualifications import snapshot_row
from storage.redis.masks import blank_in_json

KEY = b"local-data-key-of-this-provider-0123456789"
CODE, OTHER_CODE = "0123456789ABCDEF", "FEDCBA9876543210"
CONSUMER, OTHER_CONSUMER = "ab" * 32, "cd" * 32
MASK = "330***********2328"


def seal(sealer: Sealer, value: str = MASK, field: str = "masked_id") -> str:
    return sealer.seal(value, field=field, redemption_code=CODE, consumer_key=CONSUMER)


def test_a_sealed_mask_opens_with_the_same_key_and_context_only() -> None:
    sealer = Sealer(KEY)
    token = seal(sealer)
    assert token.startswith("s1.") and MASK not in token and "2328" not in token
    assert at_rest_form(token) and not at_rest_form(MASK)
    assert sealer.open(token, field="masked_id", redemption_code=CODE, consumer_key=CONSUMER) == MASK
    # Random nonces: the same mask seals differently each time (no equality to search on).
    assert seal(sealer) != token
    # Another key, another row, another consumer or another field: nothing.
    assert Sealer(b"x" * 32).open(token, field="masked_id", redemption_code=CODE, consumer_key=CONSUMER) == ""
    assert sealer.open(token, field="masked_id", redemption_code=OTHER_CODE, consumer_key=CONSUMER) == ""
    assert sealer.open(token, field="masked_id", redemption_code=CODE, consumer_key=OTHER_CONSUMER) == ""
    assert sealer.open(token, field="masked_phone", redemption_code=CODE, consumer_key=CONSUMER) == ""
    # Tampered, truncated or not a token at all: nothing, never an exception.
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    for stored in (flipped, token[:50], MASK, "", "s1.!!!!", "s1." + "A" * 60):
        assert sealer.open(stored, field="masked_id", redemption_code=CODE, consumer_key=CONSUMER) == ""


def test_without_a_local_data_key_nothing_is_stored_and_nothing_opens() -> None:
    sealer = Sealer()
    assert not sealer.enabled
    assert seal(sealer) == ""
    token = seal(Sealer(KEY))
    assert sealer.open(token, field="masked_id", redemption_code=CODE, consumer_key=CONSUMER) == ""
    assert seal(Sealer(KEY), value="") == ""  # no phone given: nothing to seal


def test_the_local_data_key_is_at_least_32_bytes_and_not_a_shared_key() -> None:
    with pytest.raises(ValueError, match="at least 32 bytes"):
        Sealer(b"short")
    assert Config.from_env({"SUBSIDY_LOCAL_DATA_KEY": KEY.decode()}).local_data_key == KEY.decode()
    with pytest.raises(ConfigError, match="SUBSIDY_LOCAL_DATA_KEY must be at least 32 bytes"):
        Config.from_env({"SUBSIDY_LOCAL_DATA_KEY": "short"})
    shared = "shared-programme-key-0123456789abcdef"
    for variable in ("SUBSIDY_PROGRAMME_KEY", "SUBSIDY_EXCHANGE_KEY"):
        with pytest.raises(ConfigError, match="SUBSIDY_LOCAL_DATA_KEY must differ"):
            Config.from_env({variable: shared, "SUBSIDY_LOCAL_DATA_KEY": shared})


def test_a_snapshot_with_masks_in_clear_is_mirrored_with_them_blank() -> None:
    """A qualification claimed before masks were sealed reaches PostgreSQL without them."""
    token = seal(Sealer(KEY))
    base = {
        "code": CODE,
        "state": "ISSUED",
        "campaign": "c",
        "category": "general",
        "consumer": CONSUMER,
        "partner": "p",
        "issued_ms": 1,
        "expires_ms": 2,
        "updated_ms": 1,
    }
    legacy = snapshot_row("5-0", {**base, "masked_id": MASK, "masked_phone": "138****5678"})
    assert MASK not in legacy and "138****5678" not in legacy
    assert token in snapshot_row("5-0", {**base, "masked_id": token})


def test_masks_in_clear_are_blanked_in_stored_json_and_tokens_kept() -> None:
    token = seal(Sealer(KEY)).encode()
    answer = b'h|{"decision":"ISSUED","qualification":{"masked_id":"' + MASK.encode()
    answer += b'","masked_phone":"138****5678","cell":"30.18,120.26"}}'
    assert blank_in_json(answer) == b'h|{"decision":"ISSUED","qualification":{"masked_id":"","masked_phone":"",' + (
        b'"cell":"30.18,120.26"}}'
    )
    sealed = b'{"masked_id":"' + token + b'","masked_phone":""}'
    assert blank_in_json(sealed) == sealed
