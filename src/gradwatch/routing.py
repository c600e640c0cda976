"""Which server replica a run's agents talk to: rendezvous hashing of the run id over the replicas.

Contract
- Every rank of a run computes the same choice from the same replica list, so one replica receives the whole
  run and its series, global gradient norm and alerts come from exactly one place.
- Rendezvous (highest random weight) hashing: each replica scores blake2b(replica, run id) and the highest
  score wins. Adding or removing a replica moves only the runs that replica wins or held (about 1/N of
  them), never a reshuffle. The hash is fixed (not Python's per-process `hash()`).
- Replicas are `host:port` entries, used as given (stable names such as StatefulSet pod DNS names), or
  `dns:///name:port`, which expands to every address the name resolves to, sorted (a headless Service). The
  choice is made afresh at each connection attempt, so a DNS answer that changed (a replica not ready any
  more) moves the runs it held on their next reconnect. An entry that does not resolve drops out; when none
  resolves the first entry is used as written and gRPC's own resolver reports the failure.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["DNS_PREFIX", "Replica", "ReplicaRouter", "rendezvous_order"]

DNS_PREFIX = "dns:///"
Resolver = Callable[..., list[tuple[Any, ...]]]


@dataclass(frozen=True)
class Replica:
    """Where to connect (`address`), and the host name the server's certificate names when the address
    came from a DNS expansion (`server_name`; empty otherwise)."""

    address: str
    server_name: str = ""


def _score(replica: str, key: str) -> int:
    digest = hashlib.blake2b(f"{replica}\x00{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_order(key: str, replicas: Sequence[str]) -> list[str]:
    """`replicas` from the first choice for `key` to the last (ties, impossible in practice, by name)."""
    return sorted(replicas, key=lambda r: (-_score(r, key), r))


def _split(entry: str) -> tuple[str, int]:
    host, _, port = entry.rpartition(":")
    return host.strip("[]"), int(port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class ReplicaRouter:
    """Picks the replica of a run from `entries` (see the module docstring); `resolve` is getaddrinfo."""

    def __init__(self, entries: Sequence[str], *, resolve: Resolver = socket.getaddrinfo) -> None:
        if not entries:
            raise ValueError("ReplicaRouter needs at least one replica")
        self._entries = tuple(entries)
        self._resolve = resolve

    def replicas(self) -> list[Replica]:
        """The current replicas: fixed entries as given, DNS entries expanded, sorted and de-duplicated."""
        found: dict[str, Replica] = {}
        for entry in self._entries:
            if not entry.startswith(DNS_PREFIX):
                found.setdefault(entry, Replica(entry))
                continue
            host, port = _split(entry.removeprefix(DNS_PREFIX))
            name = "" if _is_ip(host) else host
            for address in self._addresses(host, port):
                found.setdefault(address, Replica(address, server_name=name))
        return [found[a] for a in sorted(found)]

    def _addresses(self, host: str, port: int) -> list[str]:
        if _is_ip(host):
            return [_join(host, port)]
        try:
            infos = self._resolve(host, port, type=socket.SOCK_STREAM)
        except OSError:
            return []
        return sorted({_join(str(info[4][0]), port) for info in infos})

    def pick(self, key: str) -> Replica:
        """The replica for run `key`."""
        replicas = self.replicas()
        if not replicas:
            return Replica(self._entries[0])  # nothing resolves: let gRPC resolve and report it
        by_address = {r.address: r for r in replicas}
        return by_address[rendezvous_order(key, list(by_address))[0]]
