"""The shared HTTP pieces: the server's wait in each form services send it, streamed bodies."""

from __future__ import annotations

import email.utils
import time

import pytest

from workers.sinks.http import StreamedBody, retry_after


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "7"}, 7.0),
        ({"Retry-After": "-3"}, 0.0),
        ({"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "5"}, 5.0),
        ({"X-RateLimit-Reset": "5"}, 5.0),  # the Platform sends the reset alone
        ({"X-RateLimit-Remaining": "12", "X-RateLimit-Reset": "5"}, None),  # requests left: no wait
        ({"Retry-After": "soon"}, None),
        ({"X-RateLimit-Reset": "whenever"}, None),
        ({}, None),
    ],
)
def test_retry_after_reads_seconds(headers, expected):
    assert retry_after(headers) == expected


def test_retry_after_reads_times():
    later = time.time() + 30
    http_date = email.utils.formatdate(later, usegmt=True)
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(later))
    for headers in ({"Retry-After": http_date}, {"X-RateLimit-Reset": iso}, {"X-RateLimit-Reset": f"{later:.0f}"}):
        assert 25 < retry_after(headers) <= 31, headers


def test_streamed_body_reads_parts_in_order_in_any_chunk_size():
    data = bytes(range(256)) * 50
    for size in (1, 7, 4096, -1):
        body = StreamedBody([b"head", iter([data[:1000], b"", data[1000:]]), b"tail"], len(data) + 8)
        out = b""
        while chunk := body.read(size):
            out += chunk
        assert out == b"head" + data + b"tail"
        assert len(body) == len(out)
