"""docs/rpc.md documents every RPC, message, field and status code of the service."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from server._proto.spacer.v1 import spacer_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "rpc.md").read_text()


def section(title: str) -> str:
    """The text under the '### title' heading, up to the next heading."""
    match = re.search(rf"^### {re.escape(title)}\n(.*?)(?=^#{{2,3}} |\Z)", DOC, re.MULTILINE | re.DOTALL)
    assert match, f"docs/rpc.md has no '### {title}' section"
    return match.group(1)


SERVICE = pb.DESCRIPTOR.services_by_name["Spacer"]


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
def test_every_rpc_is_described_with_its_request_and_response(method):
    rpc = SERVICE.methods_by_name[method]
    section(method)
    row = re.search(rf"^\| `{method}` \|([^\n]*)$", DOC, re.MULTILINE)
    assert row, f"{method} missing from the RPC table"
    request = ("stream " if rpc.client_streaming else "") + f"`{rpc.input_type.name}`"
    response = ("stream " if rpc.server_streaming else "") + f"`{rpc.output_type.name}`"
    assert request in row.group(1) and response in row.group(1), row.group(0)


@pytest.mark.parametrize("message", list(pb.DESCRIPTOR.message_types_by_name))
def test_every_message_and_field_is_documented(message):
    text = section(message)
    descriptor = pb.DESCRIPTOR.message_types_by_name[message]
    documented = set(re.findall(r"^\| `(\w+)` \|", text, re.MULTILINE))
    fields = {f.name for f in descriptor.fields}
    assert documented == fields, f"{message}: documented {sorted(documented)}, proto has {sorted(fields)}"
    if not fields:
        assert "No fields" in text


def _codes_the_server_returns() -> set[str]:
    """Status codes named in the server's error mapping and call logging."""
    source = "".join((ROOT / "server" / name).read_text() for name in ("errors.py", "logs.py"))
    codes = set(re.findall(r"StatusCode\.([A-Z_]+)\b", source))
    codes |= set(re.findall(r"\bcode\.([A-Z_]+)\b", source))
    codes |= set(re.findall(r'"(DEADLINE_EXCEEDED|CANCELLED|OK)"', source))
    return codes


def test_every_status_code_the_server_returns_is_documented():
    table = DOC[DOC.index("## Status codes") :]
    documented = set(re.findall(r"^\| `([A-Z_]+)` \|", table, re.MULTILINE))
    returned = _codes_the_server_returns()
    assert {"INVALID_ARGUMENT", "NOT_FOUND", "INTERNAL", "DEADLINE_EXCEEDED"} <= returned
    assert returned <= documented, f"undocumented: {sorted(returned - documented)}"
    assert documented <= {c.name for c in grpc.StatusCode}
