"""HDFS: no Hadoop can run here, so the store is tested against our WebHDFS-protocol test server
(helpers/webhdfs_server.py, a test double: no HDFS semantics) requiring SPNEGO, with tickets from a real
throwaway MIT KDC (helpers/kerberos.py).

The URI uses the host "localhost" because the server's principal is HTTP/localhost. The store gets a
keytab for runyard@TEST.LOCAL through RUNYARD_KERBEROS_KEYTAB / RUNYARD_KERBEROS_PRINCIPAL; `bad_env`
swaps in the keytab of `mallory`, whose key the KDC changed after the keytab was written.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from helpers import webhdfs_server
from helpers.kerberos import Realm, realm
from helpers.stores import StoreUnderTest
from helpers.webhdfs_server import WebHdfsServer
from server.kerberos import KEYTAB_ENV, PRINCIPAL_ENV, USER_ENV

CLIENT = "runyard"


@dataclass
class KerberizedHdfs:
    realm: Realm
    server: WebHdfsServer
    client_keytab: Path

    def env(self, keytab: Path | None = None, principal: str = CLIENT) -> dict[str, str]:
        """What a process needs to use the store with `principal`'s keytab."""
        return {**self.realm.env, KEYTAB_ENV: str(keytab or self.client_keytab),
                PRINCIPAL_ENV: self.realm.principal(principal), USER_ENV: principal,
                # never the machine's default ticket cache: everything comes from the keytab
                "KRB5CCNAME": f"FILE:{self.realm.workdir / 'no-default-cache'}"}

    def uri(self, path: str = "/user/runyard") -> str:
        return f"hdfs://localhost:{self.server.port}{path}"


@contextmanager
def kerberized_hdfs(workdir: Path, ticket_lifetime: str = "1h", renewable_lifetime: str = "2h"
                    ) -> Iterator[KerberizedHdfs]:
    """A KDC, the HTTP/localhost service key, a client keytab, and the WebHDFS server requiring SPNEGO."""
    with realm(workdir / "kdc", ticket_lifetime, renewable_lifetime) as kdc:
        http_keytab = kdc.add_principal("HTTP/localhost")
        client_keytab = kdc.add_principal(CLIENT)
        server = webhdfs_server.start(workdir / "hdfs", keytab=http_keytab, env=kdc.env)
        try:
            yield KerberizedHdfs(kdc, server, client_keytab)
        finally:
            server.stop()


@contextmanager
def running(workdir: Path) -> Iterator[StoreUnderTest]:
    with kerberized_hdfs(workdir) as hdfs:
        stale_keytab = hdfs.realm.add_principal("mallory")
        hdfs.realm.change_key("mallory")
        yield StoreUnderTest("hdfs", hdfs.uri(), env=hdfs.env(),
                             bad_env=hdfs.env(stale_keytab, "mallory"), secrets=())
