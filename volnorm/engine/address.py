"""The one security rule for scheduler addresses: plain tcp:// only on this machine."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)

#: Schemes of ``distributed`` addresses whose traffic is encrypted (``inproc``: this process only).
ENCRYPTED_SCHEMES = ("tls", "wss", "inproc")


class InsecureSchedulerError(ValueError):
    """A scheduler address that would carry the data in clear text to another machine."""


def is_loopback(address: str) -> bool:
    """Whether every address the host of ``address`` resolves to is a loopback address.

    Parameters
    ----------
    address : str
        A ``distributed`` address such as ``"tcp://127.0.0.1:8786"``.

    Returns
    -------
    bool
        False for an empty host (``tcp://:8786``, every interface), ``0.0.0.0``, a name that
        does not resolve, or anything that is not an address.

    Examples
    --------
    >>> is_loopback("tcp://127.0.0.1:8786"), is_loopback("tcp://[::1]:8786"), is_loopback("tcp://192.0.2.1:8786")
    (True, True, False)
    """
    import ipaddress
    import socket
    from urllib.parse import urlsplit

    try:
        host = urlsplit(address).hostname or ""
        if not host:
            return False
        try:  # a literal IP needs no resolver (and no wait for one)
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            pass
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False


def check_address(address: Any, *, allow_insecure: bool = False, what: str = "scheduler") -> None:
    """The one security rule for where volnorm sends data: refuse, before any connection, a
    scheduler that would carry it in clear text beyond this machine.

    Allowed: names that are not addresses (``"local"``, ``"threads"``, ``"sync"``, ``"slurm"``,
    ``"pbs"``, ``None``), a ``distributed.Client`` (connected by the caller), an encrypted
    address (``tls://``, ``wss://``, ``inproc://``) and any address on the loopback interface.
    Refused unless ``allow_insecure``: a plain ``tcp://``, ``ws://`` (or other unencrypted)
    address of another machine, and ``"kubernetes"`` (the dask-kubernetes operator's
    scheduler and workers talk plain ``tcp://`` inside the cluster network). Only a literal
    IP address or a host name is looked at: the check itself never connects.

    Parameters
    ----------
    address : str, distributed.Client or None
        What the user named as the scheduler.
    allow_insecure : bool
        The user's explicit opt-in (CLI ``--allow-insecure``, YAML ``engine.allow_insecure``)
        for a trusted network.
    what : str
        How the user named it, for the message (``"--scheduler"``, ``"engine.scheduler"``;
        default ``"scheduler"``, the Python argument).

    Returns
    -------
    None
        Returns only when the address may be used.

    Raises
    ------
    InsecureSchedulerError
        A ``ValueError`` saying to use ``tls://`` or ``--allow-insecure``.

    Examples
    --------
    >>> check_address("tls://192.0.2.1:8786")
    >>> check_address("tcp://127.0.0.1:8786")
    >>> check_address("tcp://192.0.2.1:8786", allow_insecure=True)
    >>> check_address("tcp://192.0.2.1:8786")
    Traceback (most recent call last):
    ...
    volnorm.engine.address.InsecureSchedulerError: scheduler tcp://192.0.2.1:8786: a plain tcp:// connection to another machine is not encrypted; use tls:// (dask's TLS config), or on a trusted network --allow-insecure (YAML: engine.allow_insecure: true; Python: allow_insecure=True)
    """
    if allow_insecure or not isinstance(address, str):
        return
    if address == "kubernetes":
        raise InsecureSchedulerError(
            f"{what} kubernetes: the dask-kubernetes operator's scheduler and workers talk plain tcp:// inside the "
            "Kubernetes network; if that network is trusted: --allow-insecure (YAML: engine.allow_insecure: true; Python: allow_insecure=True)"
        )
    if "://" not in address:
        return
    scheme = address.split("://", 1)[0].lower()
    if scheme in ENCRYPTED_SCHEMES or is_loopback(address):
        return
    raise InsecureSchedulerError(
        f"{what} {address}: a plain {scheme}:// connection to another machine is not encrypted; "
        "use tls:// (dask's TLS config), or on a trusted network --allow-insecure (YAML: engine.allow_insecure: true; Python: allow_insecure=True)"
    )
