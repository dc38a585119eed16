"""The pod's command line: `covey pod`, `memory`, `chat`, `feedback`, `context`, `stop`,
`serve` and `sync`, mounted by the root command (``covey/cli.py``)."""

from covey.device.cli._chat import chat, feedback
from covey.device.cli._context import context_app, stop_command
from covey.device.cli._pod import memory_app, open_pod, pod_app
from covey.device.cli._serve import serve
from covey.device.cli._sync import sync_app

__all__ = ["chat", "context_app", "feedback", "memory_app", "open_pod", "pod_app", "serve",
           "stop_command", "sync_app"]
