"""TLS for every gRPC and HTTP port: mutual TLS inside, server TLS at the router's public doors.

The catalogue's optional `tls` section (pydantic; paths relative to the config file):

    tls:
      internal:                        # manager, worker control and the router's delivery port:
        ca: certs/ca.pem               #   both ends present a certificate signed by this CA and
        cert: certs/internal.pem       #   check the other's; a caller without one is refused
        key: certs/internal.key
        server_name: roundhouse.internal   # the name the certificate carries (a SAN); clients check
                                           # it whatever address they dial (pod IPs change)
      public:                          # the router's gRPC and HTTP ports (clients need no certificate)
        cert: certs/public.pem
        key: certs/public.key
        ca: certs/ca.pem               # optional: what `roundhouse` commands trust for it

Without `internal`, the internal ports are plaintext: keep them on a private network. Files are
read once at each service's edge (`Internal.load`, `Public.load`).
"""
from __future__ import annotations

import dataclasses
import pathlib
import ssl

import grpc
from pydantic import Field, StrictStr

from roundhouse.schema import ConfigPath
from roundhouse.schema import Strict as _Strict

DEFAULT_SERVER_NAME = "roundhouse.internal"


class TlsError(ValueError):
    """The `tls` section is wrong or names a file that cannot be read."""


class InternalSpec(_Strict):
    ca: ConfigPath = Field(description="the CA both ends' certificates are signed by")
    cert: ConfigPath
    key: ConfigPath
    server_name: StrictStr = Field(DEFAULT_SERVER_NAME, min_length=1)


class PublicSpec(_Strict):
    cert: ConfigPath
    key: ConfigPath
    ca: ConfigPath | None = Field(None, description="what `roundhouse` commands trust for it")


class TlsSpec(_Strict):
    internal: InternalSpec | None = None
    public: PublicSpec | None = None


def _read(path: str, where: str) -> bytes:
    try:
        return pathlib.Path(path).read_bytes()
    except OSError as e:
        raise TlsError(f"{where}: cannot read {path}: {e.strerror}") from None


@dataclasses.dataclass(frozen=True)
class Internal:
    """Mutual TLS between the services, loaded."""
    ca: bytes
    cert: bytes
    key: bytes
    server_name: str
    paths: InternalSpec

    @classmethod
    def load(cls, spec: InternalSpec | None) -> "Internal | None":
        if spec is None:
            return None
        return cls(_read(spec.ca, "tls.internal.ca"), _read(spec.cert, "tls.internal.cert"),
                   _read(spec.key, "tls.internal.key"), spec.server_name, spec)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)]


@dataclasses.dataclass(frozen=True)
class Public:
    """Server TLS at the router's public ports, loaded."""
    cert: bytes
    key: bytes
    ca: bytes | None
    paths: PublicSpec

    @classmethod
    def load(cls, spec: PublicSpec | None) -> "Public | None":
        if spec is None:
            return None
        return cls(_read(spec.cert, "tls.public.cert"), _read(spec.key, "tls.public.key"),
                   _read(spec.ca, "tls.public.ca") if spec.ca else None, spec)

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)])

    def ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.paths.cert, self.paths.key)
        return ctx

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """For a client of the public port (the `roundhouse` commands): trusts `ca`, else the system's."""
        return grpc.ssl_channel_credentials(root_certificates=self.ca)


def load(spec: TlsSpec | None) -> tuple[Internal | None, Public | None]:
    """The catalogue's `tls` section, its files read now (TlsError names the one that is not)."""
    if spec is None:
        return None, None
    return Internal.load(spec.internal), Public.load(spec.public)


def add_port(server, address: str, tls: "Internal | Public | None") -> int:
    """Listens on `address`, with `tls` when given (grpc.aio or grpc server alike)."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())


def channel(address: str, tls: "Internal | Public | None", options: list | None = None) -> grpc.aio.Channel:
    """A channel to `address`: mutual TLS with `Internal`, server TLS with `Public`, else plaintext."""
    options = list(options or [])
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    if isinstance(tls, Internal):
        options += tls.channel_options()
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=options)
