"""The monitoring service (``flowworker monitor``): the fleet over HTTP, for people and Prometheus.

Needs the ``monitor`` extra (FastAPI, uvicorn, prometheus-client, Jinja2); workers do not. It
reads what the workers write (heartbeat keys, queues, task records) and changes nothing but a
job it is asked to cancel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from .infrastructure import DATABASE_ERRORS, REDIS_ERRORS, Infrastructure, describe_error, initialize
from .settings import Settings
from .version import VERSION

logger = logging.getLogger('flowworker.monitor')

# seconds /healthz waits for each of Redis and PostgreSQL
HEALTH_TIMEOUT = 5.0
# seconds the monitor waits for Redis when it starts (then it exits 1 and its supervisor restarts it)
CONNECT_RETRIES = 30


def _infra(request: Request) -> Infrastructure:
    infra: Infrastructure = request.app.state.infra
    return infra


Infra = Annotated[Infrastructure, Depends(_infra)]


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


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.infra = await initialize(settings, connect_retries=CONNECT_RETRIES)
        try:
            yield
        finally:
            await app.state.infra.shutdown()

    app = FastAPI(
        title='flowworker monitor',
        version=VERSION,
        description='The flowworker fleet: workers, queues, task records; cancel a job.',
        lifespan=lifespan,
    )

    @app.get('/healthz', tags=['health'])
    async def healthz(infra: Infra) -> JSONResponse:
        """200 when Redis and PostgreSQL answer; 503 naming the one that does not."""
        failed = await check_health(infra)
        if failed:
            logger.warning('unhealthy: %s', '; '.join(f'{k}: {v}' for k, v in failed.items()))
            return JSONResponse({'status': 'unavailable', 'failed': failed}, status_code=503)
        return JSONResponse({'status': 'ok'})

    return app


def serve(settings: Settings) -> int:
    """Serve the app until SIGTERM/SIGINT; 0, or 1 if it could not start (port taken, Redis down)."""
    config: dict[str, Any] = {
        'host': settings.monitor_host,
        'port': settings.monitor_port,
        'lifespan': 'on',  # a failed start-up (Redis unreachable) stops the server
        'log_config': None,  # our logging (logs.configure), not uvicorn's
        'access_log': False,
        'server_header': False,
    }
    server = uvicorn.Server(uvicorn.Config(create_app(settings), **config))
    server.run()
    return 0 if server.started else 1
