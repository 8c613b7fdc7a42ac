"""The one HTTP client of the retriever: http(s) only, public hosts only, bounded in time and size.

Every request goes through `fetch` with an `HttpPolicy`:
- the URL must be http or https, and every address its host resolves to must
  be public (no loopback, private, link-local, reserved or multicast targets)
  unless `allow_private_hosts`; redirects are followed by hand, each hop checked;
- connect and read timeouts apply per operation, and a deadline to the whole
  request, so a server trickling one byte a second is cut off;
- the body is streamed and refused past `max_bytes`;
- every transport failure (reset, refused, bad status line, incomplete read,
  TLS, ...) becomes a `NetworkError` naming the URL; 429/503 become
  `RateLimited` (with Retry-After), a timeout `Timeout`.
"""

from __future__ import annotations

import codecs
import dataclasses
import ipaddress
import socket
import time
import urllib.parse

from retrieval.errors import NetworkError, RateLimited, Timeout

USER_AGENT = "kadiff-jax/0.1 (knowledge-augmented retrieval; +https://pypi.org/project/kadiff-jax)"


class Blocked(NetworkError):
  """A URL this policy does not fetch (scheme or host)."""


@dataclasses.dataclass(frozen=True)
class HttpPolicy:
  connect_timeout: float = 10.0
  read_timeout: float = 10.0
  deadline: float = 60.0             # seconds for a whole request, body included
  max_bytes: int = 5_000_000         # body size cap
  allow_private_hosts: bool = False  # loopback / private / link-local targets (tests, intranets)
  max_redirects: int = 5

  def __post_init__(self):
    for name in ("connect_timeout", "read_timeout", "deadline"):
      if not getattr(self, name) > 0:
        raise ValueError(f"{name}={getattr(self, name)!r}: expected a positive number of seconds")
    if self.max_bytes <= 0:
      raise ValueError(f"max_bytes={self.max_bytes!r}: expected a positive number")


def check_url(url: str, policy: HttpPolicy) -> None:
  """Raises Blocked unless `url` is http(s) to a host this policy may reach."""
  parts = urllib.parse.urlsplit(url)
  if parts.scheme not in ("http", "https"):
    raise Blocked(f"{url}: scheme {parts.scheme or '(none)'!r} is not fetched (only http and https)")
  host = parts.hostname
  if not host:
    raise Blocked(f"{url}: no host")
  if policy.allow_private_hosts:
    return
  try:
    infos = socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80),
                               proto=socket.IPPROTO_TCP)
  except (socket.gaierror, UnicodeError) as e:
    raise NetworkError(f"{url}: cannot resolve {host!r} ({e})") from None
  for info in infos:
    addr = ipaddress.ip_address(info[4][0].split("%")[0])
    if not addr.is_global or addr.is_multicast:
      raise Blocked(f"{url}: {host} resolves to {addr}, a non-public address (loopback, private, link-local or "
                    "reserved); pass --allow-private-hosts to fetch it")


def _charset(value: str | None) -> str:
  try:
    return codecs.lookup(value).name if value else "utf-8"
  except LookupError:
    return "utf-8"  # an unknown charset label: decode as UTF-8, replacing what does not fit


def fetch(url: str, policy: HttpPolicy, *, method: str = "GET", json_body=None,
          headers: dict[str, str] | None = None) -> tuple[bytes, str]:
  """(body, charset) of one request under `policy`."""
  import httpx
  start = time.monotonic()
  timeout = httpx.Timeout(connect=policy.connect_timeout, read=policy.read_timeout, write=policy.read_timeout,
                          pool=policy.connect_timeout)
  hdrs = {"User-Agent": USER_AGENT, **(headers or {})}
  with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
    for _ in range(policy.max_redirects + 1):
      check_url(url, policy)
      try:
        with client.stream(method, url, json=json_body, headers=hdrs) as r:
          if r.is_redirect and "location" in r.headers:
            url = str(r.url.join(r.headers["location"]))
            continue
          if r.status_code in (429, 503):
            after = r.headers.get("Retry-After", "")
            raise RateLimited(f"HTTP {r.status_code} from {url}", float(after) if after.isdigit() else None)
          if r.status_code >= 400:
            raise NetworkError(f"HTTP {r.status_code} from {url}")
          declared = r.headers.get("Content-Length", "")
          if declared.isdigit() and int(declared) > policy.max_bytes:
            raise NetworkError(f"{url}: body of {int(declared)} bytes is over the {policy.max_bytes}-byte cap")
          body = bytearray()
          for chunk in r.iter_bytes():
            body += chunk
            if len(body) > policy.max_bytes:
              raise NetworkError(f"{url}: body is over the {policy.max_bytes}-byte cap")
            if time.monotonic() - start > policy.deadline:
              raise Timeout(f"{url}: not complete within the {policy.deadline}s deadline")
          return bytes(body), _charset(r.charset_encoding)
      except httpx.TimeoutException:
        raise Timeout(f"no answer from {url} within {policy.read_timeout}s") from None
      except (httpx.HTTPError, httpx.InvalidURL, OSError) as e:
        raise NetworkError(f"{url}: {type(e).__name__}: {e}") from None
    raise NetworkError(f"{url}: more than {policy.max_redirects} redirects")
