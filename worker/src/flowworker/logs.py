"""Logging: one line per event, plain text or JSON."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Literal

# attributes every LogRecord has; anything else was passed with ``extra=`` and belongs in the line
_STANDARD = set(vars(logging.makeLogRecord({}))) | {'message', 'asctime', 'taskName'}


def _fields(record: logging.LogRecord) -> dict[str, object]:
    """What the call passed with ``extra=``: job id, flow, attempt, duration ..."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


class PlainFormatter(logging.Formatter):
    """``time level logger: message key=value ...``; a traceback is folded onto the same line."""

    def __init__(self) -> None:
        super().__init__('%(asctime)s %(levelname)-7s %(name)s: %(message)s')

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = ' '.join(f'{k}={v}' for k, v in _fields(record).items())
        if fields:
            head, sep, tail = line.partition('\n')
            line = f'{head} {fields}{sep}{tail}'
        return line.replace('\n', ' | ')


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            'time': datetime.fromtimestamp(record.created, UTC).isoformat(timespec='milliseconds'),
            'level': record.levelname,
            'logger': record.name,
            'message': record.getMessage(),
            **_fields(record),
        }
        if record.exc_info:
            line['exception'] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def _not_a_job_failure(record: logging.LogRecord) -> bool:
    """arq logs each failed job with its traceback; the runner's own line already says it."""
    return not str(record.msg).startswith('%6.2fs ! %s failed')


def configure(level: str, fmt: Literal['plain', 'json']) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == 'json' else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # arq logs every job start and finish itself; ours carry flow, attempt and duration instead
    arq_logger = logging.getLogger('arq.worker')
    arq_logger.setLevel(level if level == 'DEBUG' else 'WARNING')
    arq_logger.addFilter(_not_a_job_failure)
