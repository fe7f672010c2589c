"""Redis key names. One hash tag per deployment prefix.

Every key of a deployment shares the hash tag ``{prefix}``, so in a Redis Cluster they live in
one slot and each Lua script stays atomic across idempotency records, terminals, budgets and
the ledger stream. A district programme's load (thousands of authorizations per second) fits
one Redis primary; sharding by campaign would change the tag to ``{prefix:campaign}`` and move
idempotency records under it, which the key functions here make a local change.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,40}\Z")
# A shard's part of the hash tag on a Redis Cluster: "s<shard>.<salt>" (storage/redis/cluster/shards.py).
SHARD_PATTERN = re.compile(r"s[0-9]{1,4}\.[0-9]{1,6}")


@dataclass(frozen=True)
class Keys:
    prefix: str
    # On a Redis Cluster, the keys of one consumer shard: every key named here then carries the
    # tag ``{prefix:<shard>}`` instead of ``{prefix}``, so that each shard is a whole deployment's
    # key set in one hash slot and every script runs unchanged inside it (docs/scale-out.md).
    shard: str = ""

    def __post_init__(self) -> None:
        if not PREFIX_PATTERN.match(self.prefix):
            raise ValueError(f"redis key prefix must match {PREFIX_PATTERN.pattern}")
        if self.shard and not SHARD_PATTERN.fullmatch(self.shard):
            raise ValueError(f"redis key shard must match {SHARD_PATTERN.pattern}")

    @cached_property
    def tag(self) -> str:
        # Built once: an Authorize names ~23 keys, each starting with it (issue 15).
        return "{" + self.prefix + (":" + self.shard if self.shard else "") + "}"

    def pattern(self) -> str:
        """A SCAN pattern matching every key of this deployment (of this shard, for a shard's)."""
        return self.tag + ":*"

    def nonce(self, terminal_id: str, nonce: str) -> str:
        return f"{self.tag}:nonce:{terminal_id}:{nonce}"

    def idempotency(self, terminal_id: str, request_id: str) -> str:
        return f"{self.tag}:idem:{terminal_id}:{request_id}"

    def terminal(self, terminal_id: str) -> str:
        return f"{self.tag}:terminal:{terminal_id}"

    def merchant(self, merchant_id: str) -> str:
        return f"{self.tag}:merchant:{merchant_id}"

    def campaign(self, campaign_id: str) -> str:
        return f"{self.tag}:campaign:{campaign_id}"

    def region_stores(self, campaign_id: str) -> str:
        """Set: the ids of the stores inside the campaign's region, for a campaign that binds
        redemption to it (redeem_in_region_only), computed when the campaign or a store is
        published (storage/redis/reference.py) and read by authorize.lua."""
        return f"{self.tag}:region_stores:{campaign_id}"

    def rules(self, campaign_id: str) -> str:
        return f"{self.tag}:rules:{campaign_id}"

    def budget(self, campaign_id: str) -> str:
        return f"{self.tag}:budget:{campaign_id}"

    def usage(self, campaign_id: str, consumer_key: str) -> str:
        return f"{self.tag}:usage:{campaign_id}:{consumer_key}"

    def authorization(self, authorization_id: str) -> str:
        return f"{self.tag}:auth:{authorization_id}"

    def product(self, gtin: str) -> str:
        return f"{self.tag}:product:{gtin}"

    def serial(self, serial_number: str) -> str:
        """String: who holds the device (an authorization id, or ``peer:<provider>``). A device
        is its serial (SN / IMEI), whatever GTIN it is sold under: one subsidy per device serial
        in the programme (the digital-product rule), so an IMEI sold under two phone GTINs, or
        one serial on a fridge and a washer, is one device. Canonical serials contain no ':'."""
        return f"{self.tag}:serial:{serial_number}"

    @property
    def schema(self) -> str:
        """Hash: layout versions of migrated key families (see storage/redis/migrations.py)."""
        return f"{self.tag}:schema"

    def qualification(self, redemption_code: str) -> str:
        """Hash: one qualification (see claim_qualification.lua)."""
        return f"{self.tag}:qual:{redemption_code}"

    def qualification_quota(self, campaign_id: str) -> str:
        """Hash: <category>:claimed -> qualifications issued and not returned to the pool."""
        return f"{self.tag}:qquota:{campaign_id}"

    def qualification_holder(self, campaign_id: str, consumer_key: str) -> str:
        """Hash: category -> the consumer's qualifications not returned to the pool."""
        return f"{self.tag}:qholder:{campaign_id}:{consumer_key}"

    def consumer_qualifications(self, consumer_key: str) -> str:
        """Sorted set: the consumer's redemption codes scored by issue time (ms)."""
        return f"{self.tag}:quals:{consumer_key}"

    @property
    def qualification_expiry(self) -> str:
        """Sorted set: redemption codes scored by expiry (ms), for the sweeper."""
        return f"{self.tag}:qexpiry"

    @property
    def qualification_events(self) -> str:
        """Stream: every qualification's new state after each change, which the ledger writer
        process mirrors into PostgreSQL (storage/postgres/qualifications.py)."""
        return f"{self.tag}:qualification_events"

    def external_consumer(self, consumer_key: str) -> str:
        """Hash: category -> id of the service provider that reported the consumer using it
        (imported from exchange files; see server/commands/exchange.py)."""
        return f"{self.tag}:xconsumer:{consumer_key}"

    @property
    def holds(self) -> str:
        return f"{self.tag}:holds"

    @property
    def holds_set_aside(self) -> str:
        """Sorted set: holds whose expiry failed (a poison item), scored by when they were set
        aside (ms). The sweeper goes on with the rest; reconcile, metrics and health report them."""
        return f"{self.tag}:holds_set_aside"

    @property
    def qualifications_set_aside(self) -> str:
        """Sorted set: redemption codes whose expiry failed, like ``holds_set_aside``."""
        return f"{self.tag}:qexpiry_set_aside"

    @property
    def ledger(self) -> str:
        return f"{self.tag}:ledger"

    @property
    def blocks(self) -> str:
        """Hash: ``<KIND>:<subject id>`` -> the block's expiry (ms, 0 = until lifted), for every
        block in force (CONSUMER, DEVICE, MERCHANT, TERMINAL, PARTNER_APP); field ``_version``: the
        PostgreSQL change it reflects (storage/redis/blocks.py). Read by the scripts in their call."""
        return f"{self.tag}:blocks"

    def velocity(self, campaign_id: str, kind: str, subject_id: str) -> str:
        """A campaign's velocity counter for a subject (kind ``t`` terminal: sorted set of its sales
        in the last hour; ``m`` merchant: hash programme day -> sales; ``c`` consumer: sorted set,
        with an empty subject the prefix authorize.lua completes). See authorize.lua."""
        return f"{self.tag}:vel:{campaign_id}:{kind}:{subject_id}"

    def price_mix(self, campaign_id: str) -> str:
        """The prefix of the price flag's per-day hash of a campaign (authorize.lua appends the
        programme day): <category>:n / :t and <category>:<merchant>:n / :t / :flagged."""
        return f"{self.tag}:pricemix:{campaign_id}:"

    @property
    def risk_events(self) -> str:
        """Stream: every decline by a risk rule and every flag (``risk_event`` in _lib.lua), which
        the ledger writer process writes into PostgreSQL (storage/postgres/risk_events.py)."""
        return f"{self.tag}:risk_events"

    @property
    def credentials(self) -> str:
        """Hash: terminal id -> JSON {"merchant": ..., "secret": ...}."""
        return f"{self.tag}:credentials"

    @property
    def reference_version(self) -> str:
        """Incremented by every publication of reference data."""
        return f"{self.tag}:reference_version"
