"""What the complaints desk reads from the hot path's Redis to check a ticket's link (issue 14,
section 3): who an authorization or a qualification belongs to, and whether a merchant exists.
Reads only; the desk writes nothing here (a refund goes through RedisStore.refund)."""

from __future__ import annotations

from dataclasses import dataclass

from storage.redis.store import RedisStore, text


@dataclass(frozen=True)
class Owner:
    """Whose an object is: its merchant, its consumer and (qualifications) the partner app it
    was claimed through and the authorization that redeemed it."""

    merchant_id: str = ""
    terminal_id: str = ""
    consumer_key: str = ""
    partner_id: str = ""
    authorization_id: str = ""


async def authorization_owner(store: RedisStore, authorization_id: str) -> Owner | None:
    merchant, terminal, consumer = await store.redis.hmget(
        store.keys.authorization(authorization_id), ["merchant", "terminal", "consumer"]
    )
    if merchant is None:
        return None
    return Owner(
        merchant_id=text(merchant),
        terminal_id=text(terminal) if terminal else "",
        consumer_key=text(consumer) if consumer else "",
    )


async def qualification_owner(store: RedisStore, redemption_code: str) -> Owner | None:
    """The qualification's partner app and consumer, and the merchant of the authorization that
    redeemed it ("" when none did)."""
    partner, consumer, authorization = await store.redis.hmget(
        store.keys.qualification(redemption_code), ["partner", "consumer", "authorization"]
    )
    if partner is None:
        return None
    authorization_id = text(authorization) if authorization else ""
    merchant = ""
    if authorization_id:
        redeemed = await authorization_owner(store, authorization_id)
        merchant = redeemed.merchant_id if redeemed else ""
    return Owner(
        merchant_id=merchant,
        consumer_key=text(consumer) if consumer else "",
        partner_id=text(partner),
        authorization_id=authorization_id,
    )


async def merchant_exists(store: RedisStore, merchant_id: str) -> bool:
    return bool(await store.redis.exists(store.keys.merchant(merchant_id)))
