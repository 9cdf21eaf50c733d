"""flowworker: arq workers that run named flows from Redis queues and record every task in PostgreSQL."""

from arq import Retry

from .registry import flow
from .runner import JobInfo, current_job
from .version import VERSION

__version__ = VERSION
__all__ = ['JobInfo', 'Retry', '__version__', 'current_job', 'flow']
