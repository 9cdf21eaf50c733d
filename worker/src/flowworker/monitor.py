"""The monitoring service (``flowworker monitor``): the fleet over HTTP, for people and Prometheus.

Needs the ``monitor`` extra (FastAPI, uvicorn, prometheus-client, Jinja2); workers do not. Every
view is computed by :mod:`.fleet`, as ``flowworker status`` is. The pages are HTML rendered here,
with no script and nothing loaded from elsewhere: ``/workers`` (the fleet, charts of the last hour
drawn as inline SVG by :mod:`.charts`, the latest failures) and ``/tasks/{job_id}`` (every attempt
of one job). The only change the service makes is cancelling a job, and only for a caller with the
token ``MONITOR_TOKEN``: as a bearer token to the API, or typed into the task page's cancel form
(each cancel is logged with the client's address). With ``MONITOR_READ_TOKEN`` every read but
``/healthz`` needs that token (or ``MONITOR_TOKEN``) as a bearer token or as the password of HTTP
basic auth, which a browser asks for; ``MONITOR_SHOW_TASK_DATA=false`` leaves the tasks' results
and errors out of the API and the pages. Every response carries security headers
(:data:`SECURITY_HEADERS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import parse_qs, quote

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Security
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer
from jinja2 import Environment, PackageLoader
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from pydantic import BaseModel, Field, SecretStr
from redis.exceptions import RedisError
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from . import charts, control, fleet, report
from .infrastructure import REDIS_ERRORS, Infrastructure, describe_error
from .operations import connected, unreachable
from .schema import Status
from .settings import Settings
from .store import DATABASE_ERRORS
from .version import VERSION

logger = logging.getLogger('flowworker.monitor')

API = '/api/v1/task_queue'
# seconds /healthz waits for each of Redis and PostgreSQL
HEALTH_TIMEOUT = 5.0
# attempts, a second apart, to reach Redis at start (then it exits 1 and its supervisor restarts it)
CONNECT_RETRIES = 30
# seconds POST .../cancel waits for a worker to confirm
CANCEL_WAIT = 10.0
# seconds between reloads of the /workers page
PAGE_REFRESH = 5
# the failed attempts the /workers page lists
FAILURES_SHOWN = 20
# bytes of a form's body read at most (the cancel form sends one short field)
FORM_BYTES = 4096
# fields of a form's body parsed at most
FORM_FIELDS = 10
# the body of the task page's cancel form, for the OpenAPI document (parsed by _form)
CANCEL_FORM = {
    'required': True,
    'content': {
        'application/x-www-form-urlencoded': {
            'schema': {
                'type': 'object',
                'properties': {'token': {'type': 'string', 'description': 'MONITOR_TOKEN'}},
                'required': ['token'],
            }
        }
    },
}
CANCEL_STATUS = {
    control.Outcome.cancelled: 200,
    control.Outcome.requested: 202,
    control.Outcome.not_found: 404,
    control.Outcome.finished: 409,
}

SECURITY_HEADERS = {
    # the pages have their styles inline and nothing else, and post forms only to this service;
    # nothing may frame them
    'Content-Security-Policy': "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'",
    'X-Content-Type-Options': 'nosniff',
    'X-Frame-Options': 'DENY',
    'Referrer-Policy': 'no-referrer',
    'Cache-Control': 'no-store',
}

pages = Environment(loader=PackageLoader('flowworker'), autoescape=True)
bearer = HTTPBearer(auto_error=False, description='MONITOR_TOKEN (cancel), or MONITOR_READ_TOKEN (reads)')
basic = HTTPBasic(auto_error=False, description='any user name, MONITOR_READ_TOKEN as the password (reads)')


class Workers(BaseModel):
    workers: list[fleet.Worker]


class Queues(BaseModel):
    queues: list[fleet.Queue]
    rates: list[fleet.Rate]


class Tasks(BaseModel):
    tasks: list[fleet.Task]


class Attempts(BaseModel):
    job_id: str
    in_queue: bool = Field(description='waiting, deferred or running in its arq queue: it can be cancelled')
    attempts: list[fleet.Task] = Field(description='every attempt recorded, the first first')


class Cancelled(BaseModel):
    job_id: str
    outcome: control.Outcome
    detail: str


class Health(BaseModel):
    status: str
    failed: dict[str, str] | None = None


def _infra(request: Request) -> Infrastructure:
    infra: Infrastructure = request.app.state.infra
    return infra


Infra = Annotated[Infrastructure, Depends(_infra)]


def _matches(given: str, token: SecretStr | None) -> bool:
    return token is not None and secrets.compare_digest(given.encode(), token.get_secret_value().encode())


def _may_read(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    login: Annotated[HTTPBasicCredentials | None, Security(basic)],
) -> None:
    """With MONITOR_READ_TOKEN set, the caller presented it (or MONITOR_TOKEN), as a bearer token or
    a basic-auth password; without it, anyone may read."""
    settings = request.app.state.infra.settings
    if settings.monitor_read_token is None:
        return
    given = (
        credentials.credentials if credentials is not None else login.password if login is not None else None
    )
    if given is not None and (
        _matches(given, settings.monitor_read_token) or _matches(given, settings.monitor_token)
    ):
        return
    raise HTTPException(
        401,
        'a token is required' if given is None else 'the token is wrong',
        headers={'WWW-Authenticate': 'Bearer, Basic realm="flowworker monitor"'},
    )


def _authorized(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]
) -> None:
    """The caller presented the bearer token; with no MONITOR_TOKEN set, nobody can."""
    token = request.app.state.infra.settings.monitor_token
    if token is None:
        detail = 'cancel is disabled: the service has no MONITOR_TOKEN'
    elif credentials is None:
        detail = 'a bearer token is required'
    elif _matches(credentials.credentials, token):
        return
    else:
        detail = 'the bearer token is wrong'
    raise HTTPException(401, detail, headers={'WWW-Authenticate': 'Bearer'})


def _task_data(found: list[fleet.Task], settings: Settings) -> list[fleet.Task]:
    """``found``, less the results and errors where MONITOR_SHOW_TASK_DATA is false."""
    if settings.monitor_show_task_data:
        return found
    return [task.model_copy(update={'result': None, 'error': None}) for task in found]


def task_page(job_id: str) -> str:
    """The path of ``job_id``'s page."""
    return f'/tasks/{quote(job_id, safe="")}'


async def _attempts(infra: Infrastructure, job_id: str) -> Attempts | None:
    """``job_id``'s attempts and whether it is in a queue; None when neither is (an unknown job)."""
    found = await fleet.attempts(infra.engine, job_id)
    in_queue = await control.cancellable(infra.redis, job_id, found[-1].queue if found else None)
    if not found and not in_queue:
        return None
    return Attempts(job_id=job_id, in_queue=in_queue, attempts=_task_data(found, infra.settings))


def _client(request: Request) -> str:
    return request.client.host if request.client else 'an unknown address'


async def _cancel(infra: Infrastructure, job_id: str, request: Request) -> control.Cancel:
    """Cancel ``job_id`` for an authorized caller, logging who asked and the outcome."""
    result = await control.cancel(infra.redis, job_id, CANCEL_WAIT)
    logger.warning('cancel of job %s asked from %s: %s', job_id, _client(request), result.outcome.value)
    return result


async def _form(request: Request) -> dict[str, list[str]]:
    """The urlencoded fields of the request's body (at most :data:`FORM_BYTES`)."""
    body = b''
    async for chunk in request.stream():
        body += chunk
        if len(body) > FORM_BYTES:
            raise HTTPException(413, f'a form is at most {FORM_BYTES} bytes')
    try:
        return parse_qs(body.decode(errors='replace'), keep_blank_values=True, max_num_fields=FORM_FIELDS)
    except ValueError as e:
        raise HTTPException(400, f'the form: {e}') from None


def _page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
    html = pages.get_template(name).render(report=report, version=VERSION, **context)
    return HTMLResponse(html, status_code=status)


def _message(status: int, title: str, message: str) -> HTMLResponse:
    return _page('message.html', status, title=title, message=message)


async def check_health(infra: Infrastructure) -> dict[str, str]:
    """Each backend that does not answer within :data:`HEALTH_TIMEOUT`, with the reason."""
    failed: dict[str, str] = {}
    try:
        await asyncio.wait_for(infra.redis.ping(), HEALTH_TIMEOUT)
    except (*REDIS_ERRORS, TimeoutError) as e:
        failed['redis'] = describe_error(e)

    async def select_one() -> None:
        async with infra.engine.connect() as conn:
            await conn.execute(text('SELECT 1'))

    try:
        await asyncio.wait_for(select_one(), HEALTH_TIMEOUT)
    except DATABASE_ERRORS as e:
        failed['database'] = describe_error(e)
    return failed


def _gauge(name: str, documentation: str, samples: dict[tuple[str, ...], float], *labels: str) -> Metric:
    gauge = GaugeMetricFamily(name, documentation, labels=labels)
    for values, value in samples.items():
        gauge.add_metric(values, value)
    return gauge


class FleetMetrics:
    """The fleet's gauges as a prometheus-client collector: live workers, the queues by state and
    their oldest ready job's age, heartbeat ages. Read from Redis alone on each scrape; rates are
    PromQL's over the workers' own counters (:mod:`.metrics`)."""

    def __init__(self, workers: list[fleet.Worker], queues: list[fleet.Queue]) -> None:
        self.workers = workers
        self.queues = queues

    def collect(self) -> Iterable[Metric]:
        queues, workers = self.queues, self.workers
        return [
            _gauge(
                'flowworker_workers',
                'live worker processes (heartbeat keys arq:worker:*)',
                {
                    **{(q.name, 'running'): q.picking for q in queues},
                    **{(q.name, 'draining'): q.workers - q.picking for q in queues},
                },
                'queue',
                'state',
            ),
            _gauge(
                'flowworker_queue_length',
                'jobs queued, deferred or running (ZCARD arq:queue:<name>)',
                {(q.name,): q.length for q in queues},
                'queue',
            ),
            _gauge(
                'flowworker_queue_jobs',
                "the queue's jobs by state: ready (due, not running), deferred (not due), in_progress",
                {
                    **{(q.name, 'ready'): q.ready for q in queues},
                    **{(q.name, 'deferred'): q.deferred for q in queues},
                    **{(q.name, 'in_progress'): q.length - q.ready - q.deferred for q in queues},
                },
                'queue',
                'state',
            ),
            _gauge(
                'flowworker_queue_oldest_ready_age_seconds',
                'seconds the oldest ready job has been due (0: none ready); alert and scale on it',
                {(q.name,): q.oldest_ready_age or 0.0 for q in queues},
                'queue',
            ),
            _gauge(
                'flowworker_worker_heartbeat_age_seconds',
                'seconds since the worker last wrote its heartbeat',
                {(w.worker_id, w.host, w.queue): w.heartbeat_age for w in workers},
                'worker_id',
                'host',
                'queue',
            ),
        ]


async def _unreachable(request: Request, e: Exception) -> JSONResponse:
    detail = unreachable(e)
    logger.warning('%s %s: %s', request.method, request.url.path, detail)
    return JSONResponse({'detail': detail}, status_code=503)


async def _render_task(
    infra: Infrastructure, job_id: str, status: int = 200, notice: str = ''
) -> HTMLResponse:
    """The page of ``job_id`` (404: an unknown job), with ``notice`` above its attempts."""
    found = await _attempts(infra, job_id)
    if found is None:
        return _message(404, 'No such job', f'Job {job_id} has no attempt recorded and is not queued.')
    return _page(
        'task.html',
        status,
        job_id=job_id,
        at=datetime.now(UTC),
        latest=found.attempts[-1] if found.attempts else None,
        attempts=report.attempts_section(found.attempts, infra.settings.monitor_show_task_data),
        show_task_data=infra.settings.monitor_show_task_data,
        cancel_form=found.in_queue and infra.settings.monitor_token is not None,
        task_page=task_page(job_id),
        notice=notice,
    )


def _hour_charts(minutes: list[fleet.Minute]) -> list[charts.Chart]:
    """Throughput (attempts that succeeded) and failures (failed for good) per minute."""
    return [
        charts.minute_chart(
            'succeeded', 'Throughput', 'succeeded', [(m.minutes_ago, m.succeeded) for m in minutes]
        ),
        charts.minute_chart('failed', 'Failures', 'failed', [(m.minutes_ago, m.failed) for m in minutes]),
    ]


def _add_pages(app: FastAPI, reads: list[Any]) -> None:
    """The HTML pages: /workers, a job's page and its cancel form."""

    @app.get('/workers', response_class=HTMLResponse, tags=['pages'], dependencies=reads)
    async def workers_page(infra: Infra) -> HTMLResponse:
        """The fleet, its queues and rates, the last hour's charts and the latest failures, as a page
        that reloads itself."""
        found = await fleet.fleet(infra.redis, infra.engine)
        minutes = await fleet.per_minute(infra.engine)
        failed = _task_data(await fleet.failures(infra.engine, FAILURES_SHOWN), infra.settings)
        show = infra.settings.monitor_show_task_data
        return _page(
            'workers.html',
            fleet=found,
            charts=charts,
            hour=_hour_charts(minutes),
            failures=report.failures_section(failed, show, tuple(task_page(t.job_id) for t in failed)),
            show_task_data=show,
            refresh=PAGE_REFRESH,
        )

    @app.get(
        '/tasks/{job_id}',
        response_class=HTMLResponse,
        tags=['pages'],
        dependencies=reads,
        responses={404: {'description': 'an unknown job'}},
    )
    async def task_view(job_id: str, infra: Infra) -> HTMLResponse:
        """One job: every attempt, and a form to cancel it while it is queued or running."""
        return await _render_task(infra, job_id)

    @app.post(
        '/tasks/{job_id}/cancel',
        response_class=HTMLResponse,
        tags=['pages'],
        dependencies=reads,
        responses={401: {'description': 'no valid token in the form (or no MONITOR_TOKEN configured)'}},
        openapi_extra={'requestBody': CANCEL_FORM},
    )
    async def cancel_from_page(job_id: str, infra: Infra, request: Request) -> HTMLResponse:
        """The task page's cancel form (urlencoded ``token``: MONITOR_TOKEN): the task page again with
        the outcome, its status as the API's."""
        given = (await _form(request)).get('token', [''])[0]
        if not _matches(given, infra.settings.monitor_token):
            logger.warning('cancel of job %s refused to %s: no valid token', job_id, _client(request))
            reason = (
                'the token is wrong' if infra.settings.monitor_token else 'the service has no MONITOR_TOKEN'
            )
            return _message(401, 'Not cancelled', f'Job {job_id} was not cancelled: {reason}.')
        result = await _cancel(infra, job_id, request)
        return await _render_task(infra, job_id, CANCEL_STATUS[result.outcome], result.detail)


def create_app(infra: Infrastructure) -> FastAPI:
    app = FastAPI(
        title='flowworker monitor',
        version=VERSION,
        description='The flowworker fleet: live workers, queues, task records; cancel a job.',
        docs_url=None,  # Swagger UI and ReDoc load from a CDN; /openapi.json is the document
        redoc_url=None,
        openapi_url=None,  # served below, behind the read token
    )
    app.state.infra = infra
    for error in (RedisError, SQLAlchemyError, OSError):
        app.add_exception_handler(error, _unreachable)

    @app.middleware('http')
    async def security_headers(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    reads = [Depends(_may_read)]

    @app.get('/openapi.json', include_in_schema=False, dependencies=reads)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get(f'{API}/workers', tags=['task queue'], dependencies=reads)
    async def list_workers(infra: Infra) -> Workers:
        """The live worker processes, from their heartbeat keys ``arq:worker:<worker-id>``."""
        return Workers(workers=await fleet.workers(infra.redis))

    @app.get(f'{API}/redis', tags=['task queue'], dependencies=reads)
    async def redis_in_use(infra: Infra) -> fleet.RedisNode:
        """The Redis the fleet's queues are on now: with sentinels, the master they name."""
        return await fleet.redis_node(infra.redis)

    @app.get(f'{API}/queues', tags=['task queue'], dependencies=reads)
    async def list_queues(infra: Infra) -> Queues:
        """Every queue with jobs or a live worker (``ZCARD arq:queue:<name>``), and the task rates."""
        found = await fleet.fleet(infra.redis, infra.engine)
        return Queues(queues=found.queues, rates=found.rates)

    @app.get(f'{API}/tasks', tags=['task queue'], dependencies=reads)
    async def list_tasks(
        infra: Infra,
        status: Status | None = None,
        flow: str | None = None,
        older_than: Annotated[
            str | None, Query(description='started more than this long ago: 90s, 10m, 2h, 1d')
        ] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    ) -> Tasks:
        """Jobs (their latest attempt), newest first."""
        try:
            age = None if older_than is None else fleet.parse_duration(older_than)
        except ValueError as e:
            raise HTTPException(422, f'older_than: {e}') from None
        found = await fleet.tasks(infra.engine, status=status, flow=flow, older_than=age, limit=limit)
        return Tasks(tasks=_task_data(found, infra.settings))

    @app.get(
        f'{API}/tasks/{{job_id}}',
        tags=['task queue'],
        dependencies=reads,
        responses={404: {'description': 'no attempt recorded and not in a queue'}},
    )
    async def get_task(job_id: str, infra: Infra) -> Attempts:
        """Every attempt of one job, the first first, and whether it is in its queue."""
        found = await _attempts(infra, job_id)
        if found is None:
            raise HTTPException(404, f'job {job_id} has no attempt recorded and is not queued')
        return found

    @app.post(
        f'{API}/tasks/{{job_id}}/cancel',
        tags=['task queue'],
        dependencies=[Depends(_authorized)],
        response_model=Cancelled,
        responses={
            202: {'model': Cancelled, 'description': 'requested; no worker has acted on it yet'},
            401: {'description': 'no valid bearer token (or no MONITOR_TOKEN configured)'},
            404: {'model': Cancelled, 'description': 'the job is not queued or running'},
            409: {'model': Cancelled, 'description': 'the job has already finished'},
        },
    )
    async def cancel_task(job_id: str, infra: Infra, request: Request) -> JSONResponse:
        """Abort a queued or running job (arq abort); its worker records it ``cancelled``."""
        result = await _cancel(infra, job_id, request)
        body = Cancelled(job_id=job_id, outcome=result.outcome, detail=result.detail)
        return JSONResponse(body.model_dump(mode='json'), status_code=CANCEL_STATUS[result.outcome])

    _add_pages(app, reads)

    @app.get('/metrics', response_class=Response, tags=['metrics'], dependencies=reads)
    async def metrics(infra: Infra) -> Response:
        """Prometheus text: live workers, queues and their jobs by state, oldest ready age, heartbeat ages."""
        live = await fleet.workers(infra.redis)
        collector = FleetMetrics(live, await fleet.queues(infra.redis, live))
        return Response(generate_latest(collector), media_type=CONTENT_TYPE_LATEST)

    @app.get('/healthz', tags=['health'], response_model=Health, responses={503: {'model': Health}})
    async def healthz(infra: Infra) -> JSONResponse:
        """200 when Redis and PostgreSQL answer; 503 naming the one that does not."""
        failed = await check_health(infra)
        if failed:
            logger.warning('unhealthy: %s', '; '.join(f'{k}: {v}' for k, v in failed.items()))
            return JSONResponse({'status': 'unavailable', 'failed': failed}, status_code=503)
        return JSONResponse({'status': 'ok'})

    return app


class _Server(uvicorn.Server):
    """uvicorn's server; after a graceful stop on SIGTERM/SIGINT it returns (the command exits 0
    once its connections are closed, as the worker does) instead of re-raising the signal."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def serve(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; 0, or 1 if the server could not start (the port is taken).

    Redis and PostgreSQL are connected first: :class:`operations.Unreachable` if Redis does not
    answer within :data:`CONNECT_RETRIES` attempts.
    """
    config: dict[str, Any] = {
        'host': settings.monitor_host,
        'port': settings.monitor_port,
        'log_config': None,  # our logging (logs.configure), not uvicorn's
        'access_log': False,
        'server_header': False,
    }

    async def main() -> bool:
        async with connected(settings, CONNECT_RETRIES) as infra:
            server = _Server(uvicorn.Config(create_app(infra), **config))
            try:
                await server.serve()
            except SystemExit:  # uvicorn's way of saying it could not start; it has logged why
                return False
            return server.started

    return 0 if asyncio.run(main()) else 1
