"""The Falcon WSGI app: bid, notices and health on the bid port; readiness, metrics on the admin one.

``create_app(settings)`` runs once in the Gunicorn master (``preload_app``):
the catalog, the model and the compiled arrays are built before fork and
shared copy-on-write. Sockets and file handles (memcached, the ledger) are
opened per process after fork.
"""
from __future__ import annotations

import io
import logging
import math
import os
import sqlite3
import threading
import time
import zlib
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import NamedTuple
from urllib.parse import parse_qsl

import falcon
import msgspec

from bidder import catalog as catalog_mod
from bidder import metrics
from bidder.auction import Auction, NoBid, Prepared
from bidder.currency import Rates, to_micros
from bidder.budget import Budgets
from bidder.featurestore import (UNWRITTEN_MAX, FeatureStore, frequency_key, parse_servers,
                                 pending_key)
from bidder.leases import Clock
from bidder.leases import Settings as LeaseSettings
from bidder.ledger import Ledger, LedgerError, Notice, open_ledger
from bidder.logs import FaultLog
from bidder.notices import KINDS, NoticeError, NoticeExpired, NoticeSigner, secrets_list
from bidder.openrtb import BidRequest, InvalidRequest, decode, encode_response
from bidder.settings import Settings
from bidder.model_handle import ModelHandle
from server_hooks.environ import INFLATED, READY_AT
from server_hooks.framing import GZIP_CODINGS, InflatesTooLarge, gunzip

log = logging.getLogger("bidder.app")
faults = FaultLog(log)  # bad requests and bid-path bugs: a line an interval, with the count

OPENRTB_VERSION = "2.6"
# text/plain: some exchanges' SDKs; none: 2.6 2.3 "If the content-type is missing, the bidder
# should assume the type is application/json"
JSON_TYPES = ("application/json", "text/json", "text/plain", "")
NOT_UTF8 = ("utf-16", "utf-16le", "utf-16be", "utf-32", "utf-32le", "utf-32be")  # RFC 8259 8.1
# gzip with a 2 KiB window and small state: a BidResponse is a few KiB at most, and the
# default 32 KiB window cost 38 us a response in setting up, against 7 us.
GZIP_WBITS = 16 + 11
GZIP_MEMLEVEL = 4


class ProcessState:
    """Per-process, per-thread resources, opened on first use where they are used.

    The master only checks that they can be opened: an SQLite connection or a
    memcached socket must not cross a fork. Each thread gets its own (the worker
    handles bids inline and notices in its pool thread): a pymemcache client is
    not thread-safe, and a ledger connection of its own lets a bid's spend read
    proceed while a notice's write waits on the disk.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.servers = parse_servers(settings.memcached)
        open_ledger(settings.ledger).close()  # fail at start, not on the first billing notice
        self._local = threading.local()
        self._unwritten: deque = deque(maxlen=UNWRITTEN_MAX)  # shared by this process's stores

    def after_fork(self) -> None:
        """In a new worker (the ``post_fork`` hook): forget the master's clients and kept counts."""
        self._local = threading.local()
        self._unwritten = deque(maxlen=UNWRITTEN_MAX)

    @property
    def store(self) -> FeatureStore:
        store = getattr(self._local, "store", None)
        if store is None:
            s = self.settings
            store = self._local.store = FeatureStore(
                self.servers, s.memcached_connect_timeout_ms, s.memcached_timeout_ms,
                s.memcached_retry_ms, self._unwritten)
        return store

    @property
    def ledger(self) -> Ledger:
        ledger = getattr(self._local, "ledger", None)
        if ledger is None:
            ledger = self._local.ledger = open_ledger(self.settings.ledger)
        return ledger

    def forget_ledger(self) -> None:
        """Drop this thread's ledger connection after a failure: the next use opens another."""
        ledger = getattr(self._local, "ledger", None)
        self._local.ledger = None
        if ledger is not None:
            try:
                ledger.close()
            except Exception:
                pass


BID_PATH = "/openrtb2/bid"
EARLY = "bidder.early"  # environ key: a bid request decoded and prepared in its poll


class Early(NamedTuple):
    """A bid request decoded and prepared before its turn (:meth:`BidResource.prepare`)."""

    body: bytes
    request: BidRequest
    lenient: bool
    prepared: Prepared | NoBid
    deadline: float


class BidResource:
    """``POST /openrtb2/bid``: 200 BidResponse, 204 no-bid, 4xx for bad input."""

    def __init__(self, auction: Auction, models: ModelHandle, state: ProcessState,
                 settings: Settings) -> None:
        self.auction = auction
        self.models = models
        self.state = state
        self.max_body = settings.max_body_bytes
        self.default_tmax_s = settings.default_tmax_ms / 1000.0
        self.margin_s = settings.safety_margin_ms / 1000.0

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        # Arrival: when the worker's poller saw the bytes (set by the balanced worker), so time
        # spent queued behind other requests of the same poll counts against tmax.
        arrived = req.env.get(READY_AT) or time.monotonic()
        status = 500  # what Falcon answers for anything but an HTTPError
        try:
            self._bid(req, resp, arrived)
            status = resp.status_code
        except falcon.HTTPError as exc:  # its status is set on the response only after we return
            status = exc.status_code
            raise
        finally:
            metrics.tally.inc(metrics.child(metrics.REQUESTS, str(status)))
            metrics.tally.observe(time.monotonic() - arrived)

    def prepare(self, environ: dict) -> Early | None:
        """Decode a plain bid request's body and prepare its auction ahead of its turn (see
        :meth:`BidderApp.prefetch`); None for anything else (it is handled entirely in its
        turn, where any problem is answered). Stored in the environ under EARLY."""
        if environ.get("PATH_INFO") != BID_PATH or environ.get("REQUEST_METHOD") != "POST" \
                or content_type_problem(environ.get("CONTENT_TYPE", "")):
            return None
        body = environ.get(INFLATED)  # a gzip body the worker inflated
        if body is None:
            stream = environ.get("wsgi.input")
            if environ.get("HTTP_CONTENT_ENCODING", "identity") != "identity" \
                    or not isinstance(stream, io.BytesIO):
                return None
            body = stream.getvalue()
        if not body or len(body) > self.max_body:
            return None
        try:
            request, lenient = decode(body)
            prepared = self.auction.prepare(request)
        except Exception:  # bad input or a bug: its turn answers it as always
            return None
        early = environ[EARLY] = Early(body, request, lenient, prepared,
                                       self.deadline(request, environ.get(READY_AT)
                                                     or time.monotonic()))
        return early

    def deadline(self, request: BidRequest, arrived: float) -> float:
        """When ``request``, arrived at ``arrived``, must be answered: its tmax (else the
        default) less the safety margin (at most half of it)."""
        tmax_s = request.tmax / 1000.0 if request.tmax else self.default_tmax_s
        return arrived + tmax_s - min(self.margin_s, tmax_s / 2)

    def _bid(self, req: falcon.Request, resp: falcon.Response, arrived: float) -> None:
        body = self._read_body(req)
        early = req.env.get(EARLY)
        if early is not None and early.body == body:  # decoded and prepared in its poll
            request, lenient, prepared, deadline = early.request, early.lenient, \
                early.prepared, early.deadline
        else:
            try:
                request, lenient = decode(body)
            except (msgspec.DecodeError, InvalidRequest) as exc:
                raise BadRequest(f"invalid OpenRTB 2.6 BidRequest: {exc}")
            prepared, deadline = None, self.deadline(request, arrived)
        if lenient:
            metrics.tally.inc(metrics.LENIENT)
        try:
            outcome = self.auction.bid(request, self.state.store, self.models.current, deadline,
                                       prepared)
        except Exception as exc:  # a bug must cost one no-bid, never a 5xx to the exchange
            faults.error(f"bid {type(exc).__name__}", "bid request %s failed; answered no-bid",
                         request.id, exc_info=True)
            outcome = NoBid("internal_error")
        resp.set_header("X-OpenRTB-Version", OPENRTB_VERSION)
        if isinstance(outcome, NoBid):
            resp.status = falcon.HTTP_204
            resp.set_header("X-Nobid-Reason", outcome.reason)
            metrics.tally.inc(metrics.child(metrics.NOBIDS, outcome.reason))
            return
        payload = encode_response(outcome)
        resp.content_type = falcon.MEDIA_JSON
        if accepts_gzip(req.get_header("Accept-Encoding")):
            deflate = zlib.compressobj(1, zlib.DEFLATED, GZIP_WBITS, GZIP_MEMLEVEL)
            payload = deflate.compress(payload) + deflate.flush()
            resp.set_header("Content-Encoding", "gzip")
            resp.set_header("Vary", "Accept-Encoding")
        resp.data = payload
        metrics.tally.inc(metrics.BIDS, sum(len(sb.bid) for sb in outcome.seatbid))

    def _read_body(self, req: falcon.Request) -> bytes:
        problem = content_type_problem(req.content_type or "")
        if problem:
            raise UnsupportedMediaType(problem)
        length = req.content_length
        if length is not None and length > self.max_body:
            if length <= 2 * self.max_body:  # read it off so the connection can carry the next
                self._discard(req.bounded_stream)  # request (larger: the worker closes it)
            raise PayloadTooLarge(f"body of {length} bytes is over the {self.max_body}-byte limit")
        # no Content-Length: a chunked body (Gunicorn decodes it in wsgi.input), or none at all
        stream = req.bounded_stream if length is not None else req.stream
        try:
            body = stream.read(self.max_body + 1)
        except OSError as exc:  # stalled past the socket timeout, reset, or cut short
            raise BadRequest(f"request body not received in full ({exc}): send all the "
                             "bytes its Content-Length announces, without stalling")
        except Exception as exc:  # the server's parser refused the framing (a bad chunk, trailer)
            raise BadRequest(f"request body framing is malformed ({type(exc).__name__}: {exc}): "
                             "send a Content-Length body or well-formed chunks (RFC 9112 7.1)")
        if len(body) > self.max_body:
            raise PayloadTooLarge(f"body is over the {self.max_body}-byte limit")
        encoding = (req.get_header("Content-Encoding") or "identity").strip().lower()
        if encoding in GZIP_CODINGS:
            inflated = req.env.get(INFLATED)  # by the worker, to read its tmax
            body = self._gunzip(body) if inflated is None else inflated
        elif encoding != "identity":
            raise UnsupportedMediaType(
                f"Content-Encoding {encoding!r} is not supported: send identity or gzip")
        if not body:
            raise BadRequest("empty body: POST an OpenRTB 2.6 BidRequest as JSON")
        return body

    @staticmethod
    def _discard(stream) -> None:
        try:
            while stream.read(65536):
                pass
        except OSError:
            pass

    def _gunzip(self, data: bytes) -> bytes:
        """The inflated body (``framing.gunzip``), or why not as a 400 or 413."""
        try:
            return gunzip(data, self.max_body)
        except InflatesTooLarge as exc:
            raise PayloadTooLarge(str(exc)) from None
        except ValueError as exc:
            raise BadRequest(str(exc)) from None


@lru_cache(maxsize=256)
def content_type_problem(content_type: str) -> str:
    """Why the bid path does not read a body of ``content_type`` as JSON ("" if it does: JSON
    types, and text ones exchanges send it as, in UTF-8). Cached: an exchange sends the same
    few header values again and again."""
    media_type, _, params = content_type.lower().partition(";")
    if media_type.strip() not in JSON_TYPES:
        return (f"Content-Type {content_type} is not supported: send the BidRequest as "
                "application/json")
    charset = params.partition("charset=")[2].split(";", 1)[0].strip(' "')
    if charset in NOT_UTF8:
        return (f"charset {charset} is not supported: JSON between systems is UTF-8 "
                "(RFC 8259 8.1); send it as UTF-8")
    return ""


@lru_cache(maxsize=256)
def accepts_gzip(accept_encoding: str | None) -> bool:
    """Whether an ``Accept-Encoding`` header allows gzip: an explicit ``gzip`` (or ``x-gzip``)
    entry decides by its q-value (``gzip;q=0`` refuses), else ``*`` does (RFC 9110 12.5.3).
    Cached: an exchange sends the same few header values again and again."""
    star = False
    for item in (accept_encoding or "").lower().split(","):
        coding, _, param = item.partition(";")
        coding, param = coding.strip(), param.strip()
        try:
            allowed = float(param[2:]) > 0 if param.startswith("q=") else True
        except ValueError:
            allowed = True
        if coding in GZIP_CODINGS:
            return allowed
        if coding == "*":
            star = allowed
    return star


class NoticeResource:
    """``GET|POST /notice/{kind}``: win (nurl), billing (burl) and loss (lurl) notices, each
    booked once fleet-wide. A billing notice books spend against the bid's budget lease and
    counts the impression against frequency caps; a loss notice releases the bid's
    reservation. The ledger down: 503, so the exchange retries."""

    def __init__(self, auction: Auction, state: ProcessState) -> None:
        self.signer = auction.signer
        self.rates = auction.rates
        self.state = state
        self.budgets = auction.budgets
        self.rules = {r.campaign: r for r in auction.budgets.rules}
        self.capped = {c.id: c for c in auction.catalog.campaigns if c.frequency_cap}

    def on_get(self, req: falcon.Request, resp: falcon.Response, kind: str) -> None:
        if kind not in KINDS:
            raise falcon.HTTPNotFound(
                description=f"unknown notice kind {kind!r}: win, billing or loss")
        # the price macro is substituted verbatim; parse the raw query so '+' etc. survive
        params = dict(parse_qsl(req.query_string, keep_blank_values=True))
        try:
            fields, price, issued_at = self.signer.verify(kind, params)
            if not self.rates.knows(fields["cur"]):
                raise NoticeError(f"currency {fields['cur']!r} has no rate")
        except NoticeExpired as exc:
            metrics.NOTICES.labels(kind, "expired").inc()
            raise BadRequest(f"{kind} notice refused: {exc}")
        except NoticeError as exc:
            metrics.NOTICES.labels(kind, "refused").inc()
            raise BadRequest(f"{kind} notice refused: {exc}")
        rule = self.rules.get(fields["c"])
        day, periods = self.budgets.periods_of(rule, issued_at)
        notice = Notice(kind=kind, bid_id=fields["b"], campaign=fields["c"], creative=fields["r"],
                        imp_id=fields["i"], user_key=fields["u"],
                        price_micros=to_micros(self.rates.to_usd(price, fields["cur"])),
                        currency=fields["cur"], test=fields["t"] == "1", holder=fields["h"],
                        day=day)
        try:
            new = self.state.ledger.record(notice, periods if kind == "billing" else ())
        except Exception as exc:  # psycopg.Error, sqlite3.Error: nothing was booked
            self.state.forget_ledger()
            faults.warning(f"ledger {type(exc).__name__}", "%s notice %s not booked, the "
                           "ledger failed (%s: %s): answered 503", kind, notice.bid_id,
                           type(exc).__name__, exc)
            raise falcon.HTTPServiceUnavailable(
                title="Service Unavailable", retry_after=5,
                description="the ledger is not reachable; nothing was booked: send the notice "
                            "again later") from None
        metrics.NOTICES.labels(kind, "booked" if new else "duplicate").inc()
        if new and kind == "billing":
            if not notice.test:
                metrics.SPEND_MICROS.labels(notice.campaign).inc(notice.price_micros // 1000)
            self._count_impression(notice)
        elif new and kind == "loss":
            metrics.LOSSES.labels(loss_reason(params.get("loss", ""))).inc()
            self.budgets.release(notice.bid_id)  # another worker's: it reads the loss back
            self._release_pending(notice)
        resp.media = {"status": "booked" if new else "duplicate", "bid": notice.bid_id}

    on_post = on_get

    def _count_impression(self, notice: Notice) -> None:
        campaign = self.capped.get(notice.campaign)
        if campaign is not None and notice.user_key:
            store = self.state.store
            store.count_impression(frequency_key(campaign.id, notice.user_key),
                                   campaign.frequency_cap.window_s)
            store.release_pending(pending_key(campaign.id, notice.user_key))

    def _release_pending(self, notice: Notice) -> None:
        campaign = self.capped.get(notice.campaign)
        if campaign is not None and notice.user_key:
            self.state.store.release_pending(pending_key(campaign.id, notice.user_key))


def loss_reason(raw: str) -> str:
    """An OpenRTB loss reason code as a metrics label: bounded, whatever the exchange sends."""
    if raw.isdigit() and len(raw) <= 4:
        return raw if int(raw) < 1000 else "other"
    return "unknown"


class HealthResource:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"status": "ok", "pid": os.getpid()}

    on_head = on_get  # load balancers probe with HEAD too


class ReadyResource:
    """200 when catalog and model are loaded (memcached is reported, but only degrades)."""

    def __init__(self, auction: Auction, models: ModelHandle, state: ProcessState) -> None:
        self.auction = auction
        self.models = models
        self.state = state

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        catalog = self.auction.catalog
        model = self.models.status()
        components = {
            "catalog": {"ok": bool(catalog.campaigns), "path": catalog.path,
                        "campaigns": len(catalog.campaigns),
                        "candidates": len(catalog.candidates)},
            "model": {"ok": bool(model.get("loaded")), **model},
            "memcached": self.state.store.status(),
            "budgets": self.auction.budgets.status(),
        }
        ready = components["catalog"]["ok"] and components["model"]["ok"] \
            and components["budgets"]["ok"]
        resp.status = falcon.HTTP_200 if ready else falcon.HTTP_503
        resp.media = {"ready": ready, "pid": os.getpid(), "components": components}

    on_head = on_get


class MetricsResource:
    def __init__(self, models: ModelHandle) -> None:
        self.models = models

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.content_type = "text/plain; version=0.0.4; charset=utf-8"
        resp.data = metrics.render(self.models.status)


class BadRequest(falcon.HTTPBadRequest):
    def __init__(self, message: str) -> None:
        super().__init__(title="Bad Request", description=message)


class PayloadTooLarge(falcon.HTTPContentTooLarge):
    def __init__(self, message: str) -> None:
        super().__init__(title="Payload Too Large",
                         description=message + "; raise --max-body-bytes if it is legitimate")


class UnsupportedMediaType(falcon.HTTPUnsupportedMediaType):
    def __init__(self, message: str) -> None:
        super().__init__(title="Unsupported Media Type", description=message)


def _error_serializer(req: falcon.Request, resp: falcon.Response,
                      exc: falcon.HTTPError) -> None:
    """Every error is ``{"error": "..."}`` and one log line (4xx never reaches the exchange as 5xx)."""
    message = exc.description or exc.title
    resp.content_type = falcon.MEDIA_JSON
    resp.data = msgspec.json.encode({"error": message})
    if exc.status_code < 500:
        metrics.BAD_REQUESTS.labels(str(exc.status_code)).inc()
        route = req.uri_template or "unrouted"
        faults.warning(f"{exc.status_code} {req.method} {route}", "%s %s -> %d: %s", req.method,
                       req.path, exc.status_code, message, status=exc.status_code, route=route)


class BidderApp(falcon.App):
    """The bid app (bid, notices, ``/healthz``), Gunicorn's WSGI callable on both listeners: a
    request that came in on the admin listener (``--admin-bind``; Gunicorn sets ``SERVER_PORT``
    from the listening socket) goes to ``admin`` (``/metrics``, ``/readyz``, ``/healthz``), so
    spend, campaign ids and file paths never answer on the port exchanges call. Holds what the
    life cycle hooks of ``bidder/serve.py`` act on: the model handle (reloaded on SIGHUP,
    watched in each worker), the per-process state and the budget leases."""

    models: ModelHandle
    budgets: Budgets
    state: ProcessState
    admin: falcon.App
    admin_port: str

    bids: BidResource

    def __call__(self, environ, start_response):
        if environ.get("SERVER_PORT") == self.admin_port:
            return self.admin(environ, start_response)
        return super().__call__(environ, start_response)

    @contextmanager
    def prefetch(self, environs: list[dict]) -> Iterator[None]:
        """The worker is about to handle ``environs`` (one poll's requests) one after another:
        decode and prepare the plain bid requests among them now and read all their look-ups
        in one memcached round trip, which their turns then use (measured in docs/tuning.md,
        "One look-up per poll"). Their turns answer them as always; the values read are
        forgotten when the block ends."""
        store = self.state.store
        keys: dict[str, None] = {}
        earliest = math.inf
        for environ in environs:
            early = self.bids.prepare(environ)
            if early is not None and not isinstance(early.prepared, NoBid) \
                    and early.prepared.user_keys:
                keys.update(dict.fromkeys(early.prepared.user_keys))
                keys.update(dict.fromkeys(early.prepared.counter_keys))
                earliest = min(earliest, early.deadline)
        if keys:
            try:
                store.prefetch(list(keys), earliest - time.monotonic())
            except Exception:  # a bug: each turn then reads its own, as without a prefetch
                faults.error("prefetch", "reading a poll's look-ups at once failed; each "
                             "request reads its own", exc_info=True)
        try:
            yield
        finally:
            store.forget_prefetched()


class StartupError(RuntimeError):
    """The server cannot start: a bad catalog, model, rate table or ledger path."""


def create_app(settings: Settings) -> BidderApp:
    try:
        rates = Rates.parse(settings.currency_rates)
        catalog = catalog_mod.load(settings.campaigns, rates)
        models = ModelHandle(settings.model, watch_s=settings.model_watch_s)
    except (ValueError, OSError) as exc:  # CatalogError, CurrencyError, artifact errors
        raise StartupError(str(exc)) from None
    signer = NoticeSigner(settings.notice_url or f"http://{settings.bind}", settings.notice_secret,
                          secrets_list(settings.notice_verify_secrets), settings.notice_ttl_s)
    try:
        clock = Clock(settings.budget_clock)
    except ValueError as exc:
        raise StartupError(f"{exc} (--budget-clock)") from None
    budgets = Budgets(catalog, rates, lambda: open_ledger(settings.ledger), clock, LeaseSettings(
        slice_share=settings.lease_slice, reservation_ttl_s=settings.reservation_ttl_s,
        lease_ttl_s=settings.lease_ttl_s, catchup_s=settings.pacing_catchup_s))
    auction = Auction(catalog, rates, signer, budgets)
    auction.scoring_terms(models.current)  # computed before fork, shared by workers
    try:
        state = ProcessState(settings)
    except ValueError as exc:  # a --memcached address that is neither HOST:PORT nor unix:PATH
        raise StartupError(str(exc)) from None
    except LedgerError as exc:
        raise StartupError(f"{exc}; check --ledger") from None
    except (OSError, sqlite3.Error) as exc:
        raise StartupError(f"cannot open the ledger {settings.ledger!r} ({exc}): its directory "
                           "must exist and be writable; choose another with --ledger PATH") from None

    app = BidderApp(media_type=falcon.MEDIA_JSON)
    # msgspec for the JSON media bodies Falcon handles (health, readiness, notices), by Falcon's
    # recipe; JSONHandler turns an empty or malformed body into a 400 (the bid body is decoded
    # by the bid resource itself, into typed structs)
    handler = falcon.media.JSONHandler(dumps=msgspec.json.Encoder().encode,
                                       loads=msgspec.json.Decoder().decode)
    app.req_options.media_handlers[falcon.MEDIA_JSON] = handler
    app.resp_options.media_handlers[falcon.MEDIA_JSON] = handler
    app.set_error_serializer(_error_serializer)
    app.bids = BidResource(auction, models, state, settings)
    app.add_route(BID_PATH, app.bids)
    app.add_route("/notice/{kind}", NoticeResource(auction, state))
    app.add_route("/healthz", HealthResource())
    app.models = models
    app.state = state
    app.budgets = budgets
    app.admin = admin = falcon.App(media_type=falcon.MEDIA_JSON)
    admin.resp_options.media_handlers = app.resp_options.media_handlers
    admin.set_error_serializer(_error_serializer)
    admin.add_route("/healthz", HealthResource())
    admin.add_route("/readyz", ReadyResource(auction, models, state))
    admin.add_route("/metrics", MetricsResource(models))
    app.admin_port = settings.admin_bind.rpartition(":")[2]
    return app
