"""Where a dataset download may connect: public addresses only, checked on every connection.

In a cluster (``--public-only``, which the pipelines render for every cluster Workflow) a dataset
URL is the user's choice and the pod sits inside the cluster network, so a URL must never reach
the cluster's own services, the node, a cloud metadata endpoint or a private network:

* **names** that only mean something inside the cluster are refused before any lookup: single
  labels (``kubernetes``, resolved through the pod's search domains), ``*.svc``, ``*.cluster.local``
  (and the admin's ``--cluster-domain``), ``*.local``, ``*.internal``, ``localhost``;
* **addresses**: every connection, the first one, each redirect's and each retry's, resolves the
  host itself, checks *every* address it got (``ipaddress``: anything not globally routable —
  loopback, RFC 1918, CGNAT 100.64/10, link-local with the 169.254.169.254 metadata endpoint,
  unique-local and mapped IPv6, multicast, reserved — plus Azure's wireserver 168.63.129.16 and
  the admin's ``--block-cidr`` ranges such as the cluster's service CIDR) and then connects to
  exactly the address it checked. Wildcard DNS (``10.0.0.1.nip.io``) and DNS rebinding therefore
  change nothing: the check and the connection use the same lookup;
* **plain http** is refused unless the admin allowed it (``--allow-http``), redirects included;
* ``file:`` URLs are refused (the pod's own files);
* proxies from the environment are ignored (the check must see the real peer).

``--allow-cidr`` lets an admin name ranges that are allowed although not public (an in-cluster
mirror they trust). Tests use it for 127.0.0.1 and a resolver of their own, so no test sends
traffic anywhere but loopback.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from stepkit.common import StepError
from stepkit.redaction import redact_url

Resolver = Callable[[str, int], list[str]]
# Azure's wireserver: neither private nor link-local, yet it answers only from inside Azure.
ALWAYS_BLOCKED = ("168.63.129.16/32", "169.254.0.0/16", "fd00:ec2::254/128")
CLUSTER_SUFFIXES = (".svc", ".cluster.local", ".local", ".internal", ".localhost", ".localdomain")
CLUSTER_NAMES = ("localhost", "metadata", "metadata.google.internal")


class EgressRefused(StepError):
    """A URL, a redirect or a connection the policy refuses (exit 2: retrying will not help)."""


def system_resolver(host: str, port: int) -> list[str]:
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


@dataclass(frozen=True)
class EgressPolicy:
    allow_http: bool = False
    allow_cidr: tuple[str, ...] = ()
    block_cidr: tuple[str, ...] = ()
    cluster_domain: str = "cluster.local"
    resolver: Resolver = field(default=system_resolver, compare=False)

    def __post_init__(self) -> None:
        for flag, ranges in (("--allow-cidr", self.allow_cidr), ("--block-cidr", self.block_cidr)):
            for cidr in ranges:
                try:
                    ipaddress.ip_network(cidr, strict=False)
                except ValueError:
                    raise StepError(f"{flag}: {cidr!r} is not an IP range such as 10.0.0.0/16") from None

    # -- names and schemes (before any lookup) ---------------------------------------------------

    def check_url(self, url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        shown = redact_url(url)
        scheme = parsed.scheme.lower()
        if scheme == "http" and not self.allow_http:
            raise EgressRefused(f"url {shown!r}: plain http is refused in the cluster (use https; an admin may allow "
                                f"http with the controller's --allow-http-datasets)")
        if scheme not in ("http", "https"):
            raise EgressRefused(f"url {shown!r}: only https (and http where allowed) URLs are fetched in the cluster")
        host = (parsed.hostname or "").rstrip(".").lower()
        if not host:
            raise EgressRefused(f"url {shown!r}: no host")
        if self._literal(host) is None and (why := self.cluster_name(host)):
            raise EgressRefused(f"url {shown!r}: host {host!r} {why}; dataset URLs must be public")

    def cluster_name(self, host: str) -> str | None:
        if host in CLUSTER_NAMES:
            return "names this machine or a metadata service"
        if "." not in host:
            return "is a single-label name, which the pod resolves through the cluster's search domains"
        suffixes = (*CLUSTER_SUFFIXES, "." + self.cluster_domain.strip(".").lower())
        if host.endswith(suffixes) or host == self.cluster_domain.strip(".").lower():
            return "is a cluster-internal DNS name"
        return None

    # -- addresses (at each connection) ----------------------------------------------------------

    @staticmethod
    def _literal(host: str) -> Any:
        try:
            return ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            return None

    def address_refusal(self, address: str) -> str | None:
        """Why ``address`` may not be connected to, or None."""
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip in ipaddress.ip_network(c, strict=False) for c in self.allow_cidr):
            return None
        if any(ip.version == ipaddress.ip_network(c).version and ip in ipaddress.ip_network(c)
               for c in ALWAYS_BLOCKED):
            return "a link-local or cloud metadata address"
        if any(ip.version == ipaddress.ip_network(c, strict=False).version and ip in ipaddress.ip_network(c, strict=False)
               for c in self.block_cidr):
            return "in a range the admin blocked (--block-cidr: the cluster's service or pod network)"
        if ip.is_loopback:
            return "a loopback address"
        if ip.is_link_local:
            return "a link-local address"
        if ip.is_private or not ip.is_global:
            return "a private, shared or reserved address"
        if ip.is_multicast:
            return "a multicast address"
        return None

    def vetted(self, host: str, port: int) -> list[str]:
        """The addresses of ``host`` to connect to; raises ``EgressRefused`` if any is not public."""
        literal = self._literal(host)
        if literal is None and (why := self.cluster_name(host.rstrip(".").lower())):
            raise EgressRefused(f"host {host!r} {why}; dataset URLs must be public")
        addresses = [str(literal)] if literal is not None else self.resolver(host, port)
        if not addresses:
            raise EgressRefused(f"host {host!r} has no address")
        for address in addresses:
            why = self.address_refusal(address)
            if why:
                raise EgressRefused(f"host {host!r} resolves to {address}, {why}; dataset URLs must reach public "
                                    f"addresses only")
        return addresses


def guarded_client_args(policy: EgressPolicy, timeout_s: float) -> dict[str, Any]:
    """``httpx.Client`` arguments that enforce ``policy`` on every request and connection."""
    import httpcore  # noqa: PLC0415 - the step imports httpx (0.1 s) only when it downloads
    import httpx  # noqa: PLC0415

    class GuardedBackend(httpcore.SyncBackend):
        def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                        local_address: str | None = None, socket_options: Sequence[Any] | None = None) -> Any:
            last: Exception | None = None
            for address in policy.vetted(host, port):
                try:  # exactly the address just checked: a second lookup could answer otherwise
                    return super().connect_tcp(address, port, timeout, local_address, socket_options)
                except httpcore.ConnectError as exc:
                    last = exc
            raise last or httpcore.ConnectError(f"no address of {host} answered")

    transport = httpx.HTTPTransport()
    # httpx does not take a network backend; its pool does (httpcore's documented extension point).
    transport._pool._network_backend = GuardedBackend()  # noqa: SLF001

    def on_request(request: Any) -> None:  # every request, each redirect's included
        policy.check_url(str(request.url))

    return {"transport": transport, "trust_env": False, "event_hooks": {"request": [on_request]},
            "timeout": httpx.Timeout(timeout_s), "follow_redirects": True}
