"""Checking the configured TLS files before the server starts, with the standard library's ssl.

grpc reports an unusable certificate or key only when the port is bound, as "Failed to bind",
which reads like a port clash; these checks name the file and the real cause instead.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable


def _attempt(load: Callable[[], None], what: str) -> ssl.SSLError | None:
    """Run ``load``: None when it succeeds, the SSLError when OpenSSL refuses the file's content.

    Raises:
        ValueError: the file cannot be read.
    """
    try:
        load()
    except ssl.SSLError as err:
        return err
    except OSError as err:
        raise ValueError(f"{what}: cannot read it: {err.strerror or err}") from None
    return None


def check_tls_files(cert: str | None, key: str | None, client_ca: str | None, label: Callable[[str], str]) -> None:
    """Check that the TLS settings go together and that their files are what grpc needs.

    Args:
        cert, key: the server's PEM certificate chain and its unencrypted PEM private key, both
            or neither.
        client_ca: a PEM CA bundle for client certificates; needs ``cert`` and ``key``.
        label: how a message names a setting, given its key (``tls_cert``, ``tls_key`` or
            ``tls_client_ca``), e.g. as its flag.

    Raises:
        ValueError: a setting without its partner, an unreadable file, a file that is not PEM,
            or a key that does not belong to the certificate; the message names the file.
    """
    if bool(cert) != bool(key):
        raise ValueError(f"{label('tls_cert')} and {label('tls_key')} go together")
    if not cert:
        if client_ca:
            raise ValueError(f"{label('tls_client_ca')} needs {label('tls_cert')} and {label('tls_key')}")
        return
    for name, path in (("tls_cert", cert), ("tls_client_ca", client_ca)):
        if not path:
            continue
        what = f"{label(name)} {path}"
        if (
            _attempt(lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_verify_locations(cafile=path), what)
            is not None
        ):
            raise ValueError(f"{what} is not a PEM certificate")
    what = f"{label('tls_key')} {key}"
    # the password callback keeps OpenSSL from prompting on the terminal for an encrypted key
    err = _attempt(
        lambda: ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=lambda: b""), what
    )
    if err is not None and err.reason == "KEY_VALUES_MISMATCH":
        raise ValueError(f"{what} does not match the certificate in {label('tls_cert')} {cert}")
    if err is not None:
        raise ValueError(f"{what} is not an unencrypted PEM private key")
