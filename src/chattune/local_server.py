"""What every server chattune runs on this machine (`chattune serve`, `chattune ui`) refuses before it
reads a request: the one rule both apply, in their middleware; and the port check both make before
they start. A leaf: no torch, only chattune.errors.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from chattune.errors import ChattuneError

LOOPBACK = ("127.0.0.1", "localhost", "::1")  # the Host names of a server bound to this machine only


def cross_site_refusal(
    method: str, host: str | None, origin: str | None, allowed_hosts: tuple[str, ...]
) -> str | None:
    """Why a request to a local server is refused before it is read, or None (the rule of `chattune serve`
    and `chattune ui`). `host`, `origin`: the request's Host and Origin headers.

    - a Host name not in `allowed_hosts` (when that is not empty): a page elsewhere that made its own
      domain resolve to 127.0.0.1 (DNS rebinding) would otherwise read the answers;
    - for a method other than GET/HEAD, an Origin of another site than Host: a web page's form or
      `fetch(..., {mode: "no-cors"})` posting to the local server (browsers send Origin; curl and SDKs
      don't), which would otherwise spend the GPU, or start runs, for whoever made the page.
    """
    name = (host or "").rsplit(":", 1)[0].strip("[]")
    if allowed_hosts and name not in allowed_hosts:
        return f"Host {name!r} is not served here (use the address the server printed)"
    if method not in ("GET", "HEAD") and origin and urlsplit(origin).netloc != (host or ""):
        return "a request from another site's page is refused"
    return None


def check_port_free(host: str, port: int) -> None:
    """Before a server loads anything: raise ChattuneError naming --port when host:port cannot be bound
    (another program listens there; 0 asks for any free port and is not checked)."""
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise ChattuneError(f"--host {host}: cannot be resolved ({e})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as e:
            raise ChattuneError(
                f"--port {port}: {host}:{port} cannot be served ({e.strerror}); another program may be "
                "listening there: pick another --port"
            ) from None
