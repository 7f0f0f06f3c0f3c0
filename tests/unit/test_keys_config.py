"""Keys, namespaces and option parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ectransfer.config import parse_size, redact_url
from ectransfer.errors import ConfigError, InvalidKeyError
from ectransfer.keys import storage_key, validate_key, validate_keys, validate_namespace
from ectransfer.testing import INVALID_KEYS

VALID = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"


@pytest.mark.parametrize("key", INVALID_KEYS, ids=lambda k: repr(k)[:20])
def test_invalid_keys(key: object) -> None:
    with pytest.raises(InvalidKeyError):
        validate_key(key)


def test_single_string_is_not_a_key_list() -> None:
    with pytest.raises(InvalidKeyError, match="wrap it in a list"):
        validate_keys("abc")


@given(st.text(alphabet=VALID, min_size=1, max_size=256))
def test_property_valid_keys_accepted(key: str) -> None:
    if key in (".", ".."):
        with pytest.raises(InvalidKeyError):
            validate_key(key)
    else:
        assert validate_key(key) == key
        assert "/" not in key


@given(st.text(min_size=1, max_size=300))
def test_property_keys_never_escape(key: str) -> None:
    try:
        validate_key(key)
    except InvalidKeyError:
        return
    assert set(key) <= set(VALID) and len(key) <= 256 and key not in (".", "..")


def test_namespace() -> None:
    assert validate_namespace(None) == ""
    assert storage_key(validate_namespace("qwen2.5-vl:bf16"), "k") == "qwen2.5-vl:bf16/k"
    assert storage_key("", "k") == "k"
    with pytest.raises(InvalidKeyError, match="namespace"):
        validate_namespace("a/b")


@pytest.mark.parametrize(
    "text, expected",
    [("8MiB", 8 << 20), ("2GB", 2 * 10**9), ("512", 512), (1024, 1024), ("1.5KiB", 1536), ("3 mib", 3 << 20)],
)
def test_parse_size(text: object, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-1", -5, "8XB", True, None, "1e9"])
def test_parse_size_rejects(bad: object) -> None:
    with pytest.raises(ConfigError):
        parse_size(bad)


def test_redact_url() -> None:
    assert redact_url("redis://user:hunter2@host:6379/0") == "redis://user:***@host:6379/0"
    assert "hunter2" not in redact_url("s3://b/p?secret_access_key=hunter2&region=x")
    assert redact_url("file:///mnt/ec") == "file:///mnt/ec"


@pytest.mark.parametrize("url, secret", [
    ('tiered://?tiers=[{"url":"redis://u:PASSWORD1@h:1/0"}]', "PASSWORD1"),
    ("redis://alice:PASSWORD2@host:6379/0", "PASSWORD2"),
    ("s3://b/p?secret=PASSWORD3&endpoint_url=http://x:9000", "PASSWORD3"),
    ("tiered://?tiers=rediss://:PASSWORD4@x/0", "PASSWORD4"),
])
def test_redact_url_masks_nested_passwords(url: str, secret: str) -> None:
    from ectransfer.config import redact_url

    out = redact_url(url)
    assert secret not in out and "***" in out
    assert out.split("://")[0] == url.split("://")[0] and "://" in out
