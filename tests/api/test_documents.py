"""Reading Workspace files: hostile YAML is refused with the line, addresses are judged per mode."""

import pytest

from api.documents import DocumentError, parse_documents
from api.workspace_validation import _forbidden_address


def test_duplicate_keys_name_both_lines():
    with pytest.raises(DocumentError, match=r"line 3: duplicate key 'name' \(first at line 2\)"):
        parse_documents("metadata:\n  name: a\n  name: b\n")
    # the same key in two different mappings is fine
    assert parse_documents("a: {name: x}\nb: {name: y}\n") == [{"a": {"name": "x"}, "b": {"name": "y"}}]


def test_non_utf8_names_the_line_and_byte():
    with pytest.raises(DocumentError, match=r"line 2: not UTF-8 \(byte 0xe9 at offset 14\)"):
        parse_documents(b"kind: a\nx: caf\xe9\n")
    assert parse_documents("\ufeffkind: a\n".encode()) == [{"kind": "a"}]  # a BOM is UTF-8


def test_nesting_and_alias_limits():
    assert parse_documents("a: " + "[" * 30 + "]" * 30)
    with pytest.raises(DocumentError, match="nested deeper than 32 levels"):
        parse_documents("a: " + "[" * 40 + "]" * 40)
    bomb = "a: &a [1,1,1,1,1,1,1,1,1,1]\n" + "".join(
        f"{n}: &{n} [{', '.join(['*' + p] * 10)}]\n" for p, n in zip("abcd", "bcde", strict=True))
    with pytest.raises(DocumentError, match="more than 20000 values"):
        parse_documents(bomb)


def test_empty_documents_are_dropped():
    assert parse_documents("---\n---\nkind: a\n---\n") == [{"kind": "a"}]


@pytest.mark.parametrize("host", [
    "127.0.0.1", "127.1.2.3", "0x7f.1", "2130706433", "::1", "::ffff:127.0.0.1", "10.1.2.3", "172.16.0.1",
    "192.168.1.1", "169.254.169.254", "fe80::1", "fd00:ec2::254", "168.63.129.16", "0.0.0.0", "224.0.0.1",
    "localhost", "LOCALHOST.", "api.localhost", "metadata.google.internal", "metadata", "svc.cluster.internal",
])
def test_forbidden_addresses(host):
    assert _forbidden_address(host)


@pytest.mark.parametrize("host", ["huggingface.co", "8.8.8.8", "2606:4700:4700::1111", "example.com", "a1.b2", "deadbeef.com"])
def test_public_addresses_pass(host):
    assert _forbidden_address(host) is None
