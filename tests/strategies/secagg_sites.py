"""In-process SecAgg+ sites and an honest server driving them (no transport): the sites are
the real ``SiteSecAgg``, each with a derived identity key on one registration list; and the
pieces a scripted server builds its lies from (the public graph, run sessions, signed
adverts)."""

from __future__ import annotations

from client.privacy.secagg import SecAggPolicy, SiteIdentity, SiteSecAgg
from protocol.secagg_crypto import generate_private_key, public_bytes
from protocol.secagg_encoding import Encoding
from protocol.secagg_identity import RunSession, simulation_key, simulation_registry
from protocol.secagg_protocol import Advert, advert_statement, graph_seed, neighbours

RUN = 5
ENC = Encoding(clip_range=0.5, max_sites=10, max_weight=1000)


def graph(adverts: dict[int, Advert], round_: int, degree: int) -> dict[int, list[int]]:
    """The neighbour graph every honest site computes from the public seed."""
    seed = graph_seed(RUN, round_, {i: a.site for i, a in adverts.items()})
    return neighbours(sorted(adverts), degree, seed)


def run_session(site: str, *, run: int = RUN, key=None) -> RunSession:
    """A session of ``run`` endorsed by ``key`` (default: the site's registered key)."""
    session = RunSession()
    session.start(run=run, site=site, identity_key=key or simulation_key(site))
    return session


def signed_advert(node: int, site: str, round_: int, session: RunSession, *,
                  enc=None, mask=None) -> Advert:
    """Round keys (fresh unless given) under ``site``'s name, signed by ``session``."""
    unsigned = Advert(public_bytes(enc or generate_private_key()),
                      public_bytes(mask or generate_private_key()), site)
    return Advert(unsigned.pk_enc, unsigned.pk_mask, site,
                  session.sign(advert_statement(RUN, round_, node, unsigned)), session.public,
                  session.endorsement)


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
