"""CLI commands, one module per area. Add a command here to expose it as `evomerge <name>`."""

from .demo import COMMANDS as _DEMO
from .evaluate import COMMANDS as _EVALUATE
from .merge import COMMANDS as _MERGE
from .push import COMMANDS as _PUSH
from .report import COMMANDS as _REPORT
from .run import COMMANDS as _RUN
from .serve import COMMANDS as _SERVE
from .serve_pool import COMMANDS as _SERVE_POOL
from .zoo import COMMANDS as _ZOO

COMMANDS: list = [*_DEMO, *_EVALUATE, *_MERGE, *_PUSH, *_REPORT, *_RUN, *_SERVE, *_SERVE_POOL, *_ZOO]
