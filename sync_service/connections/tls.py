"""TLS contexts for the clients, and what a failed handshake means in words.

A context verifies the server against the given CA file (or the system's CAs) unless
told otherwise; the host name is checked unless the caller turns that off.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from sync_service.errors import UserError

NAME_MISMATCH = frozenset({62, 64})
"""OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH and X509_V_ERR_IP_ADDRESS_MISMATCH."""


def client_context(
    cafile: Path | None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    *,
    verify: bool = True,
    check_hostname: bool = True,
) -> ssl.SSLContext:
    """A client context; `certfile`/`keyfile` present a client certificate (mutual TLS).
    Files that cannot be used are a `UserError` (an encrypted key too: nothing here could
    ask for its password)."""
    try:
        context = ssl.create_default_context(cafile=str(cafile) if cafile else None)
    except ssl.SSLError as error:
        raise UserError(f"cannot use the CA file {cafile}: {error.reason or error}") from None
    context.check_hostname = verify and check_hostname
    if not verify:
        context.verify_mode = ssl.CERT_NONE
    if certfile is not None:
        try:
            context.load_cert_chain(
                str(certfile), str(keyfile) if keyfile else None, password=_no_password
            )
        except _EncryptedKey as error:
            raise UserError(f"cannot use the client key {keyfile}: {error}") from None
        except ssl.SSLError as error:
            raise UserError(
                f"cannot use the client certificate {certfile} with the key {keyfile}: they "
                f"are not a PEM certificate and its private key ({error.reason or error})"
            ) from None
    return context


class _EncryptedKey(Exception):
    """OpenSSL asked for the key's password."""


def _no_password() -> str:
    raise _EncryptedKey("the key is encrypted; give an unencrypted (PEM, PKCS#8) key")


_CLIENT_REFUSED = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNSUPPORTED_CERTIFICATE",
                   "UNKNOWN_CA", "CERTIFICATE_UNKNOWN", "CERTIFICATE_EXPIRED")  # fmt: skip
"""TLS alerts by which a server refuses the client's certificate (or its absence)."""


def explain(
    error: BaseException, host: str, ca_setting: str, cert_settings: str, has_cert: bool
) -> str | None:
    """Why a TLS handshake with `host` failed, in words an operator can act on; None when
    `error` is not a TLS failure. `ca_setting` names the CA file, `cert_settings` the
    client certificate's, which `has_cert` says were given."""
    if isinstance(error, ssl.SSLCertVerificationError):
        reason = error.verify_message or error.reason or "verification failed"
        if error.verify_code in NAME_MISMATCH:
            return (
                f"host name mismatch: the server's certificate is not valid for {host!r} "
                "(connect by a name the certificate lists)"
            )
        return f"server certificate not trusted by {ca_setting} ({reason})"
    if isinstance(error, ssl.SSLError) and any(a in str(error) for a in _CLIENT_REFUSED):
        if not has_cert:
            return f"the server requires a client certificate ({error.reason}): set {cert_settings}"
        return (
            f"the server refused this client's certificate ({error.reason or error}): it "
            f"requires one its CA issued ({cert_settings})"
        )
    if isinstance(error, ssl.SSLError):
        return (
            f"protocol mismatch: the TLS handshake failed ({error.reason or error}): "
            "is it a TLS listener?"
        )
    return None
