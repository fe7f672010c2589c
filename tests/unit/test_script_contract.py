"""The Lua <-> Python contract (storage/redis/contract.py) holds on both sides: every number the
scripts use for an enum is the proto's, the scripts read KEYS and ARGV only through the names
their declaration gives, use no name they do not define, and write JSON with the field names
the Structs decode."""

from __future__ import annotations

import re
from importlib import resources
from typing import Any, get_args

import msgspec
import pytest
from subsidy_client.v1 import authorization_pb2, qualification_pb2

from server.domain.posting import FLOWS
from storage.redis import contract
from storage.redis.contract import SCRIPTS, Script
from storage.redis.scripts import script_source

LUA = resources.files("storage.redis") / "lua"
LIBRARY = "_lib.lua"
# Lua's reserved words: a declared name must not be one (it becomes a table field).
RESERVED = set(
    "and break do else elseif end false for function if in local nil not or repeat return then true until while".split()
)
GLOBALS = {"KEYS", "ARGV"}  # the only upper-case names a script may read without defining them


def lua_file(name: str) -> str:
    return (LUA / name).read_text(encoding="utf-8")


def code_of(source: str) -> str:
    """Lua source without its comments, each string literal replaced by ''."""
    out: list[str] = []
    i = 0
    while i < len(source):
        if source.startswith("--[[", i):
            i = source.index("]]", i) + 2
        elif source.startswith("--", i):
            end = source.find("\n", i)
            i = len(source) if end < 0 else end
        elif source[i] in "'\"":
            quote, j = source[i], i + 1
            while source[j] != quote:
                j += 2 if source[j] == "\\" else 1
            out.append("''")
            i = j + 1
        else:
            out.append(source[i])
            i += 1
    return "".join(out)


def names_read(code: str, table: str) -> set[str]:
    return set(re.findall(rf"(?<![\w.]){table}\.([A-Za-z_]\w*)", code))


def declared(script: Script[Any, Any, Any], table: str) -> set[str]:
    fields = set((script.keys if table == "KEY" else script.args)._fields)
    tail = script.key_tail if table == "KEY" else script.arg_tail
    return fields | ({tail.name} if tail else set())


def defined_names(code: str) -> set[str]:
    """Every name a ``local`` statement, a ``local function`` or a function's parameters define."""
    found = set(re.findall(r"\blocal\s+function\s+(\w+)", code))
    for names in re.findall(r"\blocal\s+(?!function\b)([\w\s,]+?)\s*(?:=|\n)", code):
        found |= {name.strip() for name in names.split(",")}
    for parameters in re.findall(r"\bfunction\b[\w\s.:]*\(([^)]*)\)", code):
        found |= {name.strip() for name in parameters.split(",") if name.strip()}
    for loop_names in re.findall(r"\bfor\s+([\w\s,]+?)\s+(?:=|in)\b", code):
        found |= {name.strip() for name in loop_names.split(",")}
    return found


def table_fields(code: str, opening: str) -> set[str]:
    """The field names of the table constructor that follows ``opening`` (top level only)."""
    start = code.index(opening) + len(opening)
    start = code.index("{", start)
    depth, i = 0, start
    for i in range(start, len(code)):
        depth += {"{": 1, "}": -1}.get(code[i], 0)
        if depth == 0:
            break
    body, flat, depth = code[start + 1 : i], [], 0
    for character in body:
        depth += {"{": 1, "}": -1, "(": 1, ")": -1}.get(character, 0)
        flat.append(character if depth == 0 or character in "{(" else " ")
    return set(re.findall(r"(?:^|[,{\s])([A-Za-z_]\w*)\s*=(?!=)", "".join(flat)))


def encode_names(struct: type[msgspec.Struct]) -> set[str]:
    return {field.encode_name for field in msgspec.structs.fields(struct)}


def test_decline_reason_numbers_are_the_protos() -> None:
    proto = {
        name.removeprefix("DECLINE_REASON_"): number
        for name, number in authorization_pb2.DeclineReason.items()
        if number != authorization_pb2.DECLINE_REASON_UNSPECIFIED
    }
    assert dict(contract.DECLINE_REASONS) == proto


def test_claim_decline_reason_numbers_are_the_protos() -> None:
    proto = {
        name.removeprefix("CLAIM_DECLINE_REASON_"): number
        for name, number in qualification_pb2.ClaimDeclineReason.items()
        if number != qualification_pb2.CLAIM_DECLINE_REASON_UNSPECIFIED
    }
    assert dict(contract.CLAIM_DECLINE_REASONS) == proto


def test_states_and_event_types_are_the_protos_and_the_ledgers() -> None:
    authorization_states = {
        name.removeprefix("AUTHORIZATION_STATE_")
        for name, number in authorization_pb2.AuthorizationState.items()
        if number != authorization_pb2.AUTHORIZATION_STATE_UNSPECIFIED
    }
    assert set(get_args(contract.AuthorizationState)) == authorization_states
    qualification_states = {
        name.removeprefix("QUALIFICATION_STATE_")
        for name, number in qualification_pb2.QualificationState.items()
        if number != qualification_pb2.QUALIFICATION_STATE_UNSPECIFIED
    }
    assert set(get_args(contract.QualificationState)) == qualification_states
    assert set(get_args(contract.EventType)) == set(FLOWS)


def test_the_enum_constants_are_generated_from_the_contract() -> None:
    """The bindings carry the declared numbers, and no script numbers an enum itself."""
    bindings = contract.AUTHORIZE.lua_bindings()
    for name, number in contract.DECLINE_REASONS.items():
        assert f"local {name} = {number}\n" in bindings
    assert "local QUOTA_EXHAUSTED = 10\n" in contract.CLAIM.lua_bindings()
    for script in SCRIPTS:
        code = code_of(lua_file(f"{script.name}.lua"))
        assert not re.search(r"\blocal\s+[A-Z][A-Z0-9_]*(\s*,\s*[A-Z][A-Z0-9_]*)*\s*=\s*\d", code), script.name
        assert not re.search(r"\b(decline|note)\(\s*\d", code), f"{script.name}: a decline by a bare number"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.name)
def test_scripts_read_keys_and_argv_only_by_declared_name(script: Script[Any, Any, Any]) -> None:
    code = code_of(lua_file(f"{script.name}.lua"))
    assert not re.search(r"\b(KEYS|ARGV)\b", code), f"{script.name}.lua reads KEYS or ARGV by index"
    for table in ("KEY", "ARG"):
        undeclared = names_read(code, table) - declared(script, table)
        assert not undeclared, f"{script.name}.lua reads {table}.{sorted(undeclared)}, not in its declaration"


def test_the_library_reads_only_names_some_script_declares() -> None:
    code = code_of(lua_file(LIBRARY))
    assert not re.search(r"\b(KEYS|ARGV)\b", code)
    for table in ("KEY", "ARG"):
        known = set().union(*(declared(script, table) for script in SCRIPTS))
        assert names_read(code, table) <= known


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.name)
def test_every_upper_case_name_a_script_uses_is_defined(script: Script[Any, Any, Any]) -> None:
    """A misspelt constant would read a nonexistent global at run time; this finds it before."""
    code = code_of(script_source(script))
    used = set(re.findall(r"(?<![\w.])([A-Z][A-Z0-9_]*)\b", code))
    assert used - defined_names(code) - GLOBALS == set()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.name)
def test_declared_names_are_lua_identifiers(script: Script[Any, Any, Any]) -> None:
    for table in ("KEY", "ARG"):
        for name in declared(script, table):
            assert re.fullmatch(r"[a-z_][a-z0-9_]*", name) and name not in RESERVED


def test_the_scripts_json_field_names_are_the_structs() -> None:
    """What _lib.lua and authorize.lua encode is what the Structs decode: line fields, the
    authorization's and the qualification's views, and the ledger event."""
    library = code_of(lua_file(LIBRARY))
    authorize = code_of(lua_file("authorize.lua"))
    assert table_fields(authorize, "lines[#lines + 1] =") == encode_names(contract.Line)
    assert table_fields(library, "local function auth_view(auth)") == encode_names(contract.AuthorizationView)
    assert table_fields(library, "local function qualification_view(q)") == encode_names(contract.QualificationView)
    assert table_fields(library, "local event =") == encode_names(contract.LedgerEventRecord)


def test_the_bindings_follow_the_declaration() -> None:
    bindings = contract.AUTHORIZE.lua_bindings()
    assert "if #KEYS < 21 or #ARGV < 14 then\n" in bindings
    assert "for i = 22, #KEYS, 2 do" in bindings and "for i = 15, #ARGV, 4 do" in bindings
    assert "unit_price_fen = tonumber(ARGV[i + 2])" in bindings
    bind = contract.AUTHORIZE.bind
    assert bind("KEY.nonce .. KEY.qualification_events") == "KEYS[1] .. KEYS[14]"
    assert bind("ARG.hold_ttl_s + #ARG.redemption_code") == "tonumber(ARGV[9]) + #ARGV[12]"
    # A tail is its table; comments and strings are left as they are.
    kept = "KEY_lines[i].product -- KEY.nonce\nlocal text = 'ARG.nonce'"
    assert bind("KEY.lines[i].product -- KEY.nonce\nlocal text = 'ARG.nonce'") == kept
    refund = contract.REFUND.lua_bindings()
    assert "local tail, n = KEY_serials, 0\n  for i = 16, #KEYS do\n    n = n + 1\n    tail[n] = KEYS[i]\n" in refund
    # The channel's reference is the ninth argument; the line ids follow it.
    assert contract.REFUND.bind("ARG.channel_reference") == "ARGV[9]"
    assert "local tail, n = ARG_line_ids, 0\n  for i = 10, #ARGV do\n    n = n + 1\n    tail[n] = ARGV[i]\n" in refund


def test_a_name_the_declaration_lacks_is_refused_when_loading() -> None:
    with pytest.raises(ValueError, match=r"reads ARG\.line_ids: not in the script contract"):
        contract.CANCEL.bind("return ARG.line_ids")
    with pytest.raises(ValueError, match=r"uses KEY other than as KEY\.<name>"):
        contract.CANCEL.bind("return helper(KEY)")


def test_replies_decode_into_the_declared_structs() -> None:
    """Answers as cjson writes them (integers without a fraction, the one-letter line fields)."""
    view = (
        b'{"id":"a1","state":"PENDING","campaign":"c","merchant":"m","terminal":"t","channel":1,'
        b'"lines":[{"l":"1","g":"6901234000016","c":"fridge","p":459900,"s":91980,"sn":"SN1","r":0}],'
        b'"total_fen":459900,"subsidy_fen":91980,"refunded_fen":0,"created_ms":1,"expires_ms":2,"updated_ms":1,'
        b'"qualification":""}'
    )
    approved = contract.AUTHORIZE.decoder.decode(b'{"decision":"APPROVED","authorization":' + view + b"}")
    assert isinstance(approved, contract.Approved)
    line = approved.authorization.lines[0]
    assert (line.line_id, line.category, line.unit_price_fen, line.subsidy_fen, line.serial_number) == (
        "1",
        "fridge",
        459900,
        91980,
        "SN1",
    )
    declined = contract.AUTHORIZE.decoder.decode(b'{"decision":"DECLINED","reason":14,"line_id":"2"}')
    assert declined == contract.Declined(reason=14, line_id="2")
    # An answer stored before the authorization carried its redemption code.
    older = contract.CAPTURE.decoder.decode(b'{"authorization":' + view.replace(b',"qualification":""', b"") + b"}")
    assert older.authorization.redemption_code == ""
    assert contract.FAILURE.decode(b'{"error":"INVALID_STATE","state":"VOIDED"}').details() == {"state": "VOIDED"}
    assert contract.FAILURE.decode(b'{"error":"NONCE_REUSED"}').details() == {}
    claim = contract.CLAIM.decoder.decode(b'{"decision":"DECLINED","reason":10}')
    assert claim == contract.ClaimDeclined(reason=10)
    with pytest.raises(msgspec.ValidationError):
        contract.AUTHORIZE.decoder.decode(b'{"decision":"DECLINED"}')
