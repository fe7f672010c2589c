"""Summaries of py-spy's raw (collapsed-stack) output: where the server's CPU goes.

py-spy samples the server's Python threads (``--native`` adds their C and Cython frames).
Samples whose innermost frame is a blocking wait (epoll, poll, futex) are left out. Each other
sample is charged to one *component*: the first rule that matches, walking from the innermost
frame outwards (so time in ``hmac`` called from authentication is "hashing", and time in
the interpreter's own C code goes to the Python frame that called it).

A sample says where a thread *was*, not that it had a core: on a busy machine a runnable thread
waiting for a CPU is sampled too. So the profile gives proportions only, and the CPU it
distributes is the process's own, measured from /proc over the same window: a component's
CPU-ms per 1,000 calls = its share of the samples x the process's CPU-ms per 1,000 calls.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

# (component, pattern on a frame's "function (file:line)" text), first match from the leaf.
COMPONENT_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("hashing: HMAC, SHA-256 (auth, payload hash)", re.compile(r"hashlib|hmac|libcrypto|_sha256|sha2")),
    ("protobuf (parse, serialize, build)", re.compile(r"google/protobuf|_message\.|upb|protobuf")),
    ("uuid", re.compile(r"uuid")),
    ("json (orjson)", re.compile(r"orjson")),
    # The script call's client: the lean path (storage/redis/lean.py, scripts.py) or redis-py;
    # storage/redis's other files are the store's (below).
    (
        "Redis client: lean path or redis-py (EVALSHA round trip)",
        re.compile(r"storage/redis/(lean|scripts)\.py|(?<!storage/)redis/|hiredis"),
    ),
    # Before the store's rule: the credential cache is authentication's.
    ("gateway: authentication", re.compile(r"server/rpc/auth\.py|storage/redis/credentials\.py")),
    ("gateway: store (key names, args)", re.compile(r"storage/redis/")),
    # The wrapper around every handler (server/rpc/handlers.py): error mapping, metrics, span.
    ("gateway: call guard", re.compile(r"server/rpc/(handlers|errors|metrics)\.py")),
    ("gateway: validation", re.compile(r"server/domain/|server/services/requests\.py")),
    ("gateway: Authorize handler, response", re.compile(r"server/services/(authorization|common)\.py")),
    ("gateway: Echo handler", re.compile(r"server/services/diagnostics\.py")),
    ("baseline: handler", re.compile(r"benchmarks/baseline\.py")),
    ("asyncpg client", re.compile(r"asyncpg")),
    ("logging", re.compile(r"logging/")),
    ("grpc (Python and Cython layers)", re.compile(r"grpc/|cygrpc|grpc_")),
    (
        "event loop and socket syscalls (uvloop, asyncio)",
        re.compile(r"uvloop|loop\.c|asyncio|libuv|core\.c|stream\.c|contextvars"),
    ),
)
OTHER = "other (interpreter, allocator, libc)"
POLLER = "grpc poller thread (completion queue)"
# A thread blocked in the kernel waiting for work: py-spy cannot always tell (its blocking mode
# stops the process to sample it), so these innermost frames are counted as waiting, not CPU.
WAITING_LEAF = re.compile(
    r"^(epoll_wait|epoll_pwait|epoll_pwait2|poll|ppoll|select|pselect6?|nanosleep|clock_nanosleep"
    r"|pthread_cond_wait|pthread_cond_timedwait|__futex_abstimed_wait\w*|futex_wait\w*) \("
)
# grpc.aio polls its completion queue from a Python thread of its own.
THREAD_BOOTSTRAP = re.compile(r"Thread\._bootstrap")
FRAME_FILE = re.compile(r"\(([^()]*)\)\s*$")


@dataclass(frozen=True)
class Profile:
    """One py-spy recording summarized."""

    method: str
    samples: int
    rate_hz: int
    calls: int  # completed while py-spy ran
    process_cpu_ms_per_1k: float
    components_ms_per_1k: dict[str, float]
    top_self: list[tuple[str, float]]  # innermost Python-or-native function, ms per 1k calls
    raw_path: str
    waiting_samples: int

    @property
    def sampled_ms_per_1k(self) -> float:
        return sum(self.components_ms_per_1k.values())


def parse_collapsed(text: str) -> Counter[tuple[str, ...]]:
    stacks: Counter[tuple[str, ...]] = Counter()
    for line in text.splitlines():
        head, _, count = line.rpartition(" ")
        if head and count.isdigit():
            stacks[tuple(head.split(";"))] += int(count)
    return stacks


def component_of(stack: tuple[str, ...]) -> str:
    if any(THREAD_BOOTSTRAP.search(frame) for frame in stack):
        return POLLER
    for frame in reversed(stack):
        for name, pattern in COMPONENT_RULES:
            if pattern.search(frame):
                return name
    return OTHER


def function_of(frame: str) -> str:
    """``name (path:line)`` -> ``name (path)``: one entry per function, not per line."""
    match = FRAME_FILE.search(frame)
    if match is None:
        return frame
    location = match.group(1).rpartition(":")[0] or match.group(1)
    name = frame[: match.start()].strip()
    if name.startswith("0x"):  # an unsymbolized address: name the library only
        name = "?"
    return f"{name} ({location})"


def summarize_profile(method: str, raw_path: Path, rate_hz: int, calls: int, process_cpu_ms_per_1k: float) -> Profile:
    everything = parse_collapsed(raw_path.read_text(encoding="utf-8", errors="replace") if raw_path.exists() else "")
    stacks = Counter({stack: count for stack, count in everything.items() if not WAITING_LEAF.match(stack[-1])})
    samples = sum(stacks.values())
    # Each sample carries an equal share of the process's measured CPU per 1,000 calls.
    per_sample_ms_per_1k = process_cpu_ms_per_1k / samples if samples else 0.0
    components: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    for stack, count in stacks.items():
        components[component_of(stack)] += count
        leaves[function_of(stack[-1])] += count
    return Profile(
        method=method,
        samples=samples,
        rate_hz=rate_hz,
        calls=calls,
        process_cpu_ms_per_1k=process_cpu_ms_per_1k,
        components_ms_per_1k={name: count * per_sample_ms_per_1k for name, count in components.most_common()},
        top_self=[(name, count * per_sample_ms_per_1k) for name, count in leaves.most_common(12)],
        raw_path=str(raw_path),
        waiting_samples=sum(everything.values()) - samples,
    )
