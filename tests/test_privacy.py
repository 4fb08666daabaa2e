"""Privacy signals (``bidder.privacy``): GPP strings decoded with the IAB's own examples and
strings built bit by bit, and the rule that decides whether a request may use user data."""
from __future__ import annotations

import json

import pytest

from bidder.openrtb import decode_request
from bidder.privacy import BASE64_URL, gpp_allows, gpp_sections, personal_data_allowed

TCF_EU = "CPXxRfAPXxRfAAfKABENB-CgAAAAAAAAAAYgAAAAAAAA"
US_NAT_OPTED_OUT = "BVVVVVVVVWA"  # every notice given, sale/sharing/targeting opted out
US_NAT_NOT_APPLICABLE = "BAAAAAAAAQA"


def encode(bits: str) -> str:
    """Bits -> GPP base64url, zero-padded to whole characters."""
    bits += "0" * (-len(bits) % 6)
    return "".join(BASE64_URL[int(bits[i:i + 6], 2)] for i in range(0, len(bits), 6))


def us_nat(sale: int, sharing: int, targeting: int) -> str:
    """A US national core segment: version 1, six notices given, then the three opt-outs."""
    return encode("000001" + "01" * 6 + f"{sale:02b}{sharing:02b}{targeting:02b}" + "0" * 30)


def test_header_lists_the_sections_of_the_iab_examples():
    assert gpp_sections(f"DBACNYA~{TCF_EU}~1YNN") == {2: TCF_EU, 6: "1YNN"}
    assert gpp_sections(f"DBABLA~{US_NAT_OPTED_OUT}") == {7: US_NAT_OPTED_OUT}
    assert list(gpp_sections("DBABBg~BVVVVVVY")) == [8]
    assert list(gpp_sections("DBABRg~BAAAAAAA")) == [9]
    # a Fibonacci range with a group: ids 3 and 5..8 (offset 3; then offset 2, length 3)
    header = encode("000011" "000001" "000000000010" "0" "0011" "1" "011" "0011")
    assert list(gpp_sections(header + "~a~b~c~d~e")) == [3, 5, 6, 7, 8]


@pytest.mark.parametrize("gpp, applicable, allowed", [
    (f"DBACNYA~{TCF_EU}~1YNN", None, True),  # TCF consent given, no opt-out of sale
    (f"DBACNYA~{TCF_EU}~1YYN", (2, 6), False),  # opted out of sale
    (f"DBACNYA~{TCF_EU}~1YYN", (2,), True),  # ... in a section that does not apply
    (f"DBACNYA~~1YNN", (2,), False),  # the TCF section applies but holds no consent
    (f"DBABLA~{US_NAT_OPTED_OUT}", (7,), False),
    (f"DBABLA~{US_NAT_OPTED_OUT}.YA", (7,), False),
    (f"DBABLA~{US_NAT_NOT_APPLICABLE}", (7,), True),
    (f"DBABLA~{US_NAT_NOT_APPLICABLE}.YA", (7,), False),  # Global Privacy Control set
    ("DBABLA~" + us_nat(2, 2, 2), (7,), True),  # did not opt out of anything
    ("DBABLA~" + us_nat(2, 2, 1), (7,), False),  # opted out of targeted advertising
    ("DBABBg~BVVVVVVY", (8,), False),  # California, opted out of sale and sharing
    ("DBABBg~" + encode("000001" "010101" "1010" + "0" * 30), (8,), True),
    (f"DBABLA~{US_NAT_NOT_APPLICABLE}", (8,), False),  # the section that applies is missing
    ("DBABRg~BAAAAAAA", None, False),  # a section this bidder does not read (Virginia, 9)
    ("DBABzYA~BAAAAAAA", None, False),  # the header lists 3 sections, the string holds 1
    ("not a gpp string", (7,), False), ("DBABLA~BA", (7,), False), ("", (2,), False),
    ("", (), True),  # no section applies
])
def test_gpp_allows_only_what_its_applicable_sections_allow(gpp, applicable, allowed):
    assert gpp_allows(gpp, applicable) is allowed


def _allowed(regs: dict, user: dict | None = None) -> bool:
    request = {"id": "r", "imp": [{"id": "1", "banner": {"w": 300, "h": 250}}], "regs": regs}
    if user is not None:
        request["user"] = user
    return personal_data_allowed(decode_request(json.dumps(request).encode()))


def test_request_rule_reads_gpp_beside_the_older_signals():
    assert _allowed({"gpp": f"DBABLA~{US_NAT_NOT_APPLICABLE}", "gpp_sid": [7]})
    assert not _allowed({"gpp": f"DBABLA~{US_NAT_OPTED_OUT}", "gpp_sid": [7]})
    assert not _allowed({"gpp": f"DBABLA~{US_NAT_OPTED_OUT}"})  # no gpp_sid: all sections
    assert _allowed({"gpp": f"DBABLA~{US_NAT_OPTED_OUT}", "gpp_sid": []})
    assert not _allowed({"gpp_sid": [7]})  # a section applies, the string is missing
    assert not _allowed({"gpp": f"DBABLA~{US_NAT_NOT_APPLICABLE}", "gpp_sid": "7"})
    assert not _allowed({"gpp": 7, "gpp_sid": [7]})
    assert not _allowed({"coppa": 1, "gpp": f"DBABLA~{US_NAT_NOT_APPLICABLE}", "gpp_sid": [7]})
    long_opt_out = f"DBACNYA~{TCF_EU * 60}~1YYN"  # decoded each time, not cached
    assert not _allowed({"gpp": long_opt_out, "gpp_sid": [2, 6]})
    assert _allowed({"gpp": long_opt_out, "gpp_sid": [2]})
    assert not _allowed({"gdpr": 1}, {"consent": ""})
    assert _allowed({"gdpr": 1}, {"consent": TCF_EU})
