"""Which addresses a webhook may reach: public ones, and the networks the operator's settings allow.

Loopback, link-local (where cloud metadata endpoints live), private, shared and otherwise non-global addresses
(where pods and cluster-internal Services live) are refused unless `webhookAllowedNetworks` holds them. Host
names are judged by every address they resolve to, at connect time (`GuardedResolver`), so a name cannot be
switched to an inside address between a check and the request.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

Network = IPv4Network | IPv6Network


class RefusedAddress(Exception):
    """The webhook's host is, or resolves to, an address the operator may not reach."""


def address_refusal(address: IPv4Address | IPv6Address, allowed: Sequence[Network]) -> str | None:
    """Why `address` is refused, or None when a webhook may reach it."""
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address.version == network.version and address in network for network in allowed):
        return None
    if address.is_loopback:
        kind = "a loopback address"
    elif address.is_link_local:
        kind = "a link-local address (where cloud metadata endpoints live)"
    elif address.is_multicast or address.is_unspecified or address.is_reserved:
        kind = "not a unicast address"
    elif not address.is_global:
        kind = "a private or cluster-internal address"
    else:
        return None
    return f"{address} is {kind}; the operator's webhookAllowedNetworks setting does not allow it"


def url_refusal(url: str, allowed: Sequence[Network]) -> str | None:
    """Why a webhook URL is refused before any lookup (scheme, or an address written in it), or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"must be an http:// or https:// URL, got {url!r}"
    try:
        address = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return None
    return address_refusal(address, allowed)


class GuardedResolver(AbstractResolver):
    """Resolves as aiohttp does, and refuses a host any of whose addresses is refused."""

    def __init__(self, allowed: Sequence[Network], resolver: AbstractResolver | None = None) -> None:
        self._allowed = tuple(allowed)
        self._resolver = resolver or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._resolver.resolve(host, port, family)
        for result in results:
            refusal = address_refusal(ipaddress.ip_address(result["host"]), self._allowed)
            if refusal is not None:
                raise RefusedAddress(f"{host} resolves to {refusal}")
        return results

    async def close(self) -> None:
        await self._resolver.close()
