"""`cfgengine serve`: an HTTP sampling service whose requests share one running batch
(step-level continuous batching; docs/design.md, serving). Needs the `[serve]` extra."""
from cfgengine.serve.app import create_app

__all__ = ["create_app"]
