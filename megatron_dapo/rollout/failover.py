"""Before each step, every rollout server must answer /health and hold the weights of the last sync.

A server that does not is taken out of dispatch; one that this process launched and that fails /health, or
that the client marked down during the last step (unreachable, or stuck past a deadline), is restarted. A
restarted or stale server takes no generation for the rest of the step but receives the next weight sync
(which goes to every server not marked down), and the check before the following step admits it again.
"""

import asyncio
import logging
from dataclasses import dataclass, field

from megatron_dapo.rollout.launcher import ServerPool, ServerStartError
from megatron_dapo.rollout.sglang_client import SGLangClient

logger = logging.getLogger(__name__)


@dataclass
class ServerCheck:
    """What one check found, by server URL."""

    ready: list[str] = field(default_factory=list)  # in dispatch for this step
    stale: list[str] = field(default_factory=list)  # answers, with other weights: waits for the next sync
    failed: list[str] = field(default_factory=list)  # fails /health and stays down
    restarted: list[str] = field(default_factory=list)  # launched here, restarted: waits for the next sync


async def check_servers(client: SGLangClient, pool: ServerPool | None, version: int) -> ServerCheck:
    """Admit the servers holding weight `version`, hold out the others, restart what `pool` launched and
    failed; `pool` None: servers given by URL, which are never restarted here."""
    was_down = set(client.down_servers())
    reported = await asyncio.gather(*map(client.server_weight_version, client.server_urls))
    check = ServerCheck()
    for url, server_version in zip(client.server_urls, reported, strict=True):
        if server_version is None:
            client.mark_down(url, "no answer to /health")
            check.failed.append(url)
        elif url in was_down and _launched(pool, url):
            check.failed.append(url)  # answers now, but it failed requests: a restart is safer
        elif server_version == version:
            client.admit(url)
            check.ready.append(url)
        else:
            client.hold_out(url, f"holds weight version {server_version}, the trainer {version}")
            check.stale.append(url)
    if pool is not None:
        await _restart(client, pool, [url for url in check.failed if _launched(pool, url)], check)
    return check


def _launched(pool: ServerPool | None, url: str) -> bool:
    return pool is not None and url in pool.urls


async def _restart(client: SGLangClient, pool: ServerPool, urls: list[str], check: ServerCheck) -> None:
    """Restart each of `urls`; a server that will not start stays down (the others carry on)."""
    outcomes = await asyncio.gather(*(pool.restart(url) for url in urls), return_exceptions=True)
    for url, outcome in zip(urls, outcomes, strict=True):
        if isinstance(outcome, ServerStartError):
            logger.error("rollout server %s did not restart: %s", url, outcome)
            continue
        if isinstance(outcome, BaseException):
            raise outcome
        logger.warning("rollout server %s restarted; back in dispatch once it holds the current weights", url)
        client.speeds.forget(url)
        client.weight_versions[url] = 0
        client.hold_out(url, "restarted with its initial weights")
        check.failed.remove(url)
        check.restarted.append(url)
