"""Where a webhook may be sent: no private, loopback, link-local, multicast or otherwise non-global
address (no SSRF into the server's own network) unless an operator allow-list
(`webhook_allowed_networks`) names it.

The check is made on the addresses the host name resolves to *at send time*, and the request is
then sent to exactly the address that was checked (`pinned_target`): a DNS answer that changes
between the check and the connection (DNS rebinding) cannot redirect it. Redirects are never
followed (a 3xx is a failed attempt).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressRefused(Exception):
    """The destination resolves to no address a webhook may reach."""


def refusal(ip: IPAddress, allowed: Iterable[str]) -> str | None:
    """Why `ip` may not be reached (None: it may)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    for net in allowed:
        if ip in ipaddress.ip_network(net, strict=False):
            return None
    for name in ("loopback", "link_local", "private", "multicast", "unspecified", "reserved"):
        if getattr(ip, f"is_{name}"):
            return f"{ip} is a {name.replace('_', '-')} address"
    if not ip.is_global:
        return f"{ip} is not a public address"
    return None


def literal_refusal(host: str, allowed: Iterable[str]) -> str | None:
    """For a URL given as an IP literal or `localhost`: why it can never be reached (checked when an
    endpoint is created; host names are checked again at every send)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        if host.rstrip(".").lower() == "localhost" or host.lower().endswith(".localhost"):
            ip = ipaddress.ip_address("127.0.0.1")
        else:
            return None
    return refusal(ip, allowed)


def resolve_allowed(host: str, port: int, allowed: Iterable[str]) -> IPAddress:
    """The first address `host` resolves to that a webhook may reach, else AddressRefused (naming why)."""
    allowed = list(allowed)
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise AddressRefused(f"cannot resolve {host!r}: {exc}") from exc
    reasons = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])  # IPv4/IPv6 (SOCK_STREAM): a str
        why = refusal(ip, allowed)
        if why is None:
            return ip
        reasons.append(why)
    raise AddressRefused(
        f"{host} resolves to no allowed address ({'; '.join(sorted(set(reasons)))});"
        " an operator can allow networks with HALOS_WEBHOOK_ALLOWED_NETWORKS"
    )


@dataclass(frozen=True)
class PinnedTarget:
    url: httpx.URL  # the original URL with its host replaced by the checked address
    host_header: str
    extensions: dict[str, str]  # sni_hostname: TLS still verifies the certificate of the original host


def pinned_target(url: str, allowed: Iterable[str]) -> PinnedTarget:
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise AddressRefused(f"not an http(s) URL: {url!r}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    ip = resolve_allowed(parsed.host, port, allowed)
    host_header = parsed.host if parsed.port is None else f"{parsed.host}:{parsed.port}"
    if ":" in parsed.host:  # an IPv6 literal keeps its brackets in the Host header
        host_header = f"[{parsed.host}]" if parsed.port is None else f"[{parsed.host}]:{parsed.port}"
    extensions = {"sni_hostname": parsed.host} if parsed.scheme == "https" else {}
    return PinnedTarget(parsed.copy_with(host=str(ip)), host_header, extensions)
