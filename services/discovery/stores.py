"""The two configuration stores as I/O shells: Consul KV (read, watch, write back with CAS) and a
read-only directory. Layout and document format: ``gorb.services.discovery.documents``.

``ConsulStore.watch`` runs blocking queries on ``<prefix>/`` (``wait`` 30 s) and calls
``on_change`` whenever the tree differs from the last one seen (and once after every outage),
following the index rules of ``gorb.services.discovery.blocking``. ``FileStore.watch`` polls.

Write-backs (``ConsulStore.write``) are compare-and-set on the key's ModifyIndex: the key is read,
and written only if it still holds the bytes the round planned from (``Step.expect``), with
``cas=<its ModifyIndex>`` (0 for a key that must not exist yet). A lost CAS is retried after
re-reading; a key whose content changed meanwhile is a ``StoreConflict``: the round leaves it,
and the next round sees a store change, which wins. Deleting a service's document also deletes
``backends/<vs>/`` (after the document, so no host ever sees the service with part of its
backends deleted).
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

from gorb.services.discovery import documents as docs
from gorb.services.discovery.blocking import Backoff, next_index
from gorb.services.discovery.consul_adapter import ConsulAdapter, ConsulRefused, ConsulUnavailable
from gorb.services.discovery.documents import StoreObjects
from gorb.services.discovery.reconcile import Step

log = logging.getLogger("discovery")

CAS_ATTEMPTS = 5
MAX_FILE_BYTES = 1 << 20


class StoreUnavailable(Exception):
    """The store cannot be read or written now (Consul down, directory missing): retry later."""


class StoreConflict(Exception):
    """A key changed in the store since the round read it: the store's version wins next round."""


class ConsulStore:
    writable = True

    def __init__(self, adapter: ConsulAdapter, watch_adapter: ConsulAdapter, prefix: str,
                 wait: str = "30s"):
        self.adapter = adapter            # reads and writes of the sync loop
        self.watch_adapter = watch_adapter  # its own session: a blocking query holds it
        self.prefix = prefix.strip("/")
        self.wait = wait
        self.location = f"{adapter.url}/v1/kv/{self.prefix}/"

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}"

    def read(self) -> StoreObjects:
        try:
            _, tree = self.adapter.kv_tree(self.prefix + "/")
        except (ConsulUnavailable, ConsulRefused) as exc:
            raise StoreUnavailable(str(exc)) from exc
        return docs.parse_kv(self.prefix, tree)

    def watch(self, on_change: Callable[[], None], backoff: Backoff,
              sleep: Callable[[float], None]) -> None:
        index, last, failing = 0, None, False
        while True:
            try:
                got, tree = self.watch_adapter.kv_tree(self.prefix + "/", index=index,
                                                       wait=self.wait)
            except (ConsulUnavailable, ConsulRefused) as exc:
                if not failing:
                    log.warning("store %s: cannot watch (%s); retrying", self.location, exc)
                failing, last = True, None
                sleep(backoff.next())
                continue
            if failing:
                log.info("store %s: reachable again", self.location)
            failing = False
            backoff.reset()
            previous = index
            index, _ = next_index(index, got)
            if index == 0:
                log.warning("store %s: index went backwards (%d -> %d); re-reading", self.location,
                            previous, got)
            if tree != last:
                last = tree
                on_change()
            if index <= 1:
                sleep(0.1)  # rate limit: a reset or a broken index answers at once

    def write(self, step: Step) -> None:
        """One write-back; StoreConflict or StoreUnavailable if it could not be made."""
        try:
            if step.key == docs.MARKER:
                self.adapter.kv_put(self._key(step.key), step.value, cas=0)  # exists: fine
                return
            if step.op == "store.put":
                if step.tree:
                    self._delete_tree(docs.backends_folder(step.service))
                self._cas(self._key(step.key), step.value, step.expect)
            else:
                self._cas(self._key(step.key), None, step.expect)
                if step.tree:
                    self._delete_tree(docs.backends_folder(step.service))
        except (ConsulUnavailable, ConsulRefused) as exc:
            raise StoreUnavailable(str(exc)) from exc

    def _cas(self, key: str, value: bytes | None, expect: bytes | None) -> None:
        for _ in range(CAS_ATTEMPTS):
            index, current = self.adapter.kv_get(key)
            if current == value:
                return  # already so (another host wrote the same)
            if current != expect:
                raise StoreConflict(f"{key} changed in the store meanwhile")
            if value is None:
                done = self.adapter.kv_delete(key, cas=index)
            else:
                done = self.adapter.kv_put(key, value, cas=index)
            if done:
                return
        raise StoreConflict(f"{key}: compare-and-set lost {CAS_ATTEMPTS} times")

    def _delete_tree(self, rel_folder: str) -> None:
        _, tree = self.adapter.kv_tree(self._key(rel_folder))
        for key in sorted(tree):
            for _ in range(CAS_ATTEMPTS):
                index, current = self.adapter.kv_get(key)
                if current is None or self.adapter.kv_delete(key, cas=index):
                    break


class FileStore:
    """A directory of ``<vs>.json`` documents, read-only (managed from git)."""

    writable = False

    def __init__(self, directory: str, poll: float = 5.0):
        self.directory = Path(directory)
        self.poll = poll
        self.location = f"file://{self.directory.absolute()}"

    def files(self) -> dict[str, bytes]:
        out = {}
        try:
            names = sorted(os.listdir(self.directory))
        except OSError as exc:
            raise StoreUnavailable(f"cannot list {self.directory}: {exc.strerror}") from None
        for name in names:
            if name.startswith(".") or not (name.endswith(docs.FILE_SUFFIX) or name == docs.MARKER):
                continue
            path = self.directory / name
            try:
                st = path.stat()
                if not stat.S_ISREG(st.st_mode):
                    continue
                if st.st_size > MAX_FILE_BYTES:
                    out[name] = b"\x00too large"  # reported as not JSON, isolated
                    continue
                out[name] = path.read_bytes()
            except FileNotFoundError:
                continue  # removed while listing (a git checkout in progress)
            except OSError as exc:
                raise StoreUnavailable(f"cannot read {path}: {exc.strerror}") from None
        return out

    def read(self) -> StoreObjects:
        return docs.parse_files(self.files())

    def watch(self, on_change: Callable[[], None], backoff: Backoff,
              sleep: Callable[[float], None]) -> None:
        last, failing = None, False
        while True:
            try:
                files = self.files()
            except StoreUnavailable as exc:
                if not failing:
                    log.warning("store %s: %s", self.location, exc)
                failing, last = True, None
                sleep(self.poll)
                continue
            failing = False
            if files != last:
                last = files
                on_change()
            sleep(self.poll)

    def write(self, step: Step) -> None:
        raise StoreUnavailable(f"{self.location} is read-only")
