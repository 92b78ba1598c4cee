"""In-process SecAgg+ sites and an honest server driving them (no transport): the sites are
the real ``SiteSecAgg``, each with a derived identity key on one registration list."""

from __future__ import annotations

from client.privacy.secagg import SecAggPolicy, SiteIdentity, SiteSecAgg
from protocol.secagg_identity import simulation_key, simulation_registry

RUN = 5


def make_sites(ids, round_: int, encoding, *, run: int = RUN, policy=SecAggPolicy(),
               authenticated: bool = True) -> dict[int, SiteSecAgg]:
    """Node ``i`` is registered site ``site-i``."""
    registry = simulation_registry([f"site-{i}" for i in ids])
    return {i: SiteSecAgg(i, round_, encoding, run,
                          SiteIdentity(f"site-{i}", simulation_key(f"site-{i}"), registry)
                          if authenticated else None, policy) for i in ids}


def share_keys(server, sites, *, skip=()) -> dict:
    """Stages 0-1: adverts, then every site's checked shares (``skip``: dropped before)."""
    requests = server.accept_keys({i: s.advertise() for i, s in sites.items()})
    shares = {i: sites[i].share_keys(r["participants"], r["neighbours"], r["degree"],
                                     r["threshold"])
              for i, r in requests.items() if i not in skip}
    return server.accept_shares(shares)


def finish(server, sites, masked) -> tuple:
    """Stages 3-4 and the server's unmasking: (average, weight), replies."""
    requests = server.accept_masked(masked)
    if server.config.authenticated:
        requests = server.accept_signatures({i: sites[i].sign_survivors(r["survivors"])
                                             for i, r in requests.items()})
    replies = {i: sites[i].unmask(r["survivors"], r.get("signatures"))
               for i, r in requests.items()}
    return server.unmask(replies), replies
